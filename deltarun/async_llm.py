"""The asynchronous Python API (what the server uses): many concurrent requests over one engine thread.

`AsyncLLM` shares loading, tokenizing and chat rendering with `LLM` (`Frontend`); generation runs on
the engine thread (engine/async_engine.py) and each request streams its `StreamDelta`s to its caller.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from .engine.async_engine import AsyncEngine
from .llm import Frontend, Messages, Prompt
from .outputs import RequestOutput, StreamDelta
from .processor.output import RequestState
from .sampling import SamplingParams


class AsyncLLM(Frontend):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.async_engine = AsyncEngine(self.engine)

    async def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None
                              ) -> AsyncIterator[StreamDelta]:
        """New text per sequence as it is generated; closing the iterator aborts the request."""
        async with aclosing(self._stream(self.prepare(prompt, params))) as deltas:
            async for delta in deltas:
                yield delta

    async def _stream(self, req: RequestState) -> AsyncIterator[StreamDelta]:
        async with aclosing(self.async_engine.generate(req.request_id, req.prompt_ids, req.params, req.mm)) as steps:
            async for step in steps:
                for delta in self.output.update(req, step, self.async_engine.finish):
                    yield delta
                if req.finished:  # every sequence ended (maybe by a stop string the engine has not seen yet)
                    return

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> RequestOutput:
        req = self.prepare(prompt, params)
        async for step in self.async_engine.generate(req.request_id, req.prompt_ids, req.params):
            self.output.update(req, step, self.async_engine.finish)
            if req.finished:
                break
        return self.output.result(req)

    async def chat_stream(self, messages: Messages, params: SamplingParams | None = None, *,
                          enable_thinking: bool | None = None, tools: list[dict] | None = None,
                          **template_kwargs: Any) -> AsyncIterator[StreamDelta]:
        """Stream a conversation's answer, reasoning apart from content; messages may hold image/video parts."""
        prompt, ids, thinking, mm = self.render_chat(messages, enable_thinking, tools, **template_kwargs)
        split = self.reasoning_splitter(prompt)
        # aclosing: leaving early must abort the request now, not when the inner generator is collected
        async with aclosing(self._stream(self.prepare(ids, self.chat_params(params, thinking), mm))) as deltas:
            async for delta in deltas:
                yield split(delta)

    def shutdown(self) -> None:
        self.async_engine.shutdown()
