"""The engine on its own thread, with per-request asyncio streams of step outputs (for the server).

One engine thread owns the model and caches: it drains an inbox of add/abort/finish commands, runs
`step()` while there is work, and hands each request's `StepOutput`s to that request's asyncio queue
on the caller's event loop. An exception inside a step fails only the requests of the phase that raised
(`StepFailed`); the others keep running and the engine keeps serving. Requests are validated in the
caller (`Engine.check_request`) so that bad input fails there, with a clear error, and never reaches
the loop.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncGenerator

from ..inputs import MultiModalInput, StepOutput
from ..sampling import SamplingParams
from ..threads import release_pool
from .engine import Engine, StepFailed


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stopped = False
        release_pool()  # the steps run on the engine thread: one pool of spinning workers, not two
        self._thread = threading.Thread(target=self._run, name="deltarun-engine", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       mm: MultiModalInput | None = None, adapter: str | None = None
                       ) -> AsyncGenerator[StepOutput, None]:
        """Stream a request's step outputs; leaving the loop early (or cancellation) aborts it.
        `mm`: the prompt's images/videos (`Frontend.prepare_media`); `adapter`: a registered LoRA adapter."""
        self.engine.check_request(prompt_ids, params, mm)
        if adapter is not None and adapter not in self.engine.adapters:
            raise ValueError(f"unknown adapter {adapter!r}")
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", request_id, prompt_ids, params, mm, adapter))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    def finish(self, request_id: str, index: int, reason: str, stop_reason: int | str | None = None) -> None:
        """End one sequence (a stop string was found by the caller)."""
        self._inbox.put(("finish", request_id, index, reason, stop_reason))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def alive(self) -> bool:
        """Whether the engine thread is still running (a replica's health check asks)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopped = True
        self._inbox.put(("stop",))
        self._thread.join(timeout=10)

    # -- engine thread --------------------------------------------------------------------------
    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            with self._lock:
                alive = cmd[1] in self._streams
            if alive:  # the caller may have gone before the engine saw the request
                self.engine.add_request(*cmd[1:])
        elif kind == "abort":
            self.engine.abort(cmd[1])
        elif kind == "finish":
            self.engine.finish(*cmd[1:])

    def _run(self) -> None:
        while not self._stopped:
            try:
                block = not self.engine.has_unfinished()
                cmd = self._inbox.get(block=block) if block else self._inbox.get_nowait()
                if cmd[0] == "stop":
                    return
                self._handle(cmd)
                continue  # drain the whole inbox before stepping
            except queue.Empty:
                pass
            try:
                outputs = self.engine.step()
            except StepFailed as e:  # a bug hit one phase: only its requests fail, the rest go on
                outputs = e.outputs
                for rid in e.request_ids:
                    self._deliver(rid, e.error)
            except Exception as e:  # outside any phase (the scheduler): its state is unknown, fail them all
                self._fail_all(e)
                continue
            self._deliver_all(outputs)

    def _deliver_all(self, outputs: list[StepOutput]) -> None:
        """A step's outputs, one wake-up per event loop: waking the server's loop once per request and step
        takes a core from the step's threads sixteen times a step at sixteen requests."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]] = {}
        with self._lock:
            targets = [(out, self._streams.get(out.request_id)) for out in outputs]
        for out, target in targets:
            if target is None:
                self.engine.abort(out.request_id)  # nobody listens any more
            else:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            self.engine.abort(request_id)  # nobody listens any more
            return
        loop, q = target
        loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self._deliver(rid, error)


def _put_all(items: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    for q, item in items:
        q.put_nowait(item)
