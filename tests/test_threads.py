"""Giving a thread's OpenMP workers back (threads.release_pool) and the async engine doing it: two pools of
workers make libgomp put them to sleep between parallel regions, which slowed the engine thread's steps."""
import asyncio
import os
import threading

import pytest
import torch

from deltarun.threads import release_pool


def tids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # a pool has a worker even on a one-core machine
    yield
    torch.set_num_threads(old)


def on_thread(fn):
    """Run fn on a fresh thread (a fresh OpenMP pool), re-raising what it raised."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def parallel_op() -> None:
    torch.ones(1 << 22).add_(1)  # above at::parallel_for's grain: runs on the thread's OpenMP team


def test_release_pool_ends_the_calling_threads_workers(two_threads):
    def work():
        before = tids()
        parallel_op()
        workers = tids() - before
        released = release_pool()
        left = workers & tids()
        parallel_op()  # works again afterwards (with a new pool)
        return workers, released, left

    workers, released, left = on_thread(work)
    assert workers, "a parallel op on a fresh thread started no OpenMP worker"
    assert released and not left


def test_async_engine_gives_back_the_loading_threads_pool(two_threads, chat_ckpt):
    from deltarun import SamplingParams
    from deltarun.async_llm import AsyncLLM

    def load():
        before = tids()
        parallel_op()
        workers = tids() - before
        llm = AsyncLLM(str(chat_ckpt), dtype="float32", device="cpu")  # loads here, steps on its own thread
        return llm, workers, workers & tids()

    llm, workers, left = on_thread(load)
    try:
        assert workers and not left
        res = asyncio.run(llm.generate("one two", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
        assert len(res.outputs[0].token_ids) == 4  # the engine still computes, on its own thread
    finally:
        llm.shutdown()
