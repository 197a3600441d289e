"""The async engine: concurrent requests give what the sync API gives; cancelling one aborts only it."""
import asyncio

import pytest

from deltarun import SamplingParams


@pytest.fixture(scope="module")
def async_llm(chat_ckpt):
    from deltarun.async_llm import AsyncLLM

    llm = AsyncLLM(str(chat_ckpt), dtype="float32", device="cpu")
    yield llm
    llm.shutdown()


def test_concurrent_requests_match_sync(async_llm, chat_llm):
    prompts = ["one two", "three four five", "six"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].text for o in chat_llm.generate(prompts, params)]

    async def run_all():
        async def collect(p):
            return "".join([d.text async for d in async_llm.generate_stream(p, params)])
        return await asyncio.gather(*(collect(p) for p in prompts))

    assert asyncio.run(run_all()) == expected


def test_cancel_one_keeps_others(async_llm):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        async def slow():
            async for _ in async_llm.generate_stream("abc", params):
                pass
        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        task.cancel()
        short = await async_llm.generate("def", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        return short

    out = asyncio.run(main())
    assert len(out.outputs[0].token_ids) == 5
    import time
    time.sleep(0.2)
    assert not async_llm.engine.has_unfinished()


def test_bad_request_raises_in_caller(async_llm):
    async def main():
        async for _ in async_llm.generate_stream([10**9], SamplingParams()):
            pass
    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(main())
