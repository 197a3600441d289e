"""The asynchronous Python API (what the server uses): many concurrent requests over one engine thread.

`AsyncLLM` shares loading, tokenizing and chat rendering with `LLM` (`Frontend`); generation runs on
the engine thread (engine/async_engine.py) and each request streams its `StreamDelta`s to its caller
through the one request loop (request_stream.py). It is the local `EngineClient` (client.py): the
server's routes see it through that protocol only.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from .client import EngineStats, ModelInfo, RequestObserver
from .engine.async_engine import AsyncEngine
from .engine.engine import Engine
from .llm import Frontend, Messages, Prompt
from .lora_request import LoRARequest
from .outputs import RequestOutput, StreamDelta
from .processor.output import RequestState
from .processor.reasoning import DeltaSplitter
from .request_stream import stream_request
from .sampling import SamplingParams


class AsyncLLM(Frontend):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.async_engine = AsyncEngine(self.engine)

    # -- EngineClient: the engine half ----------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stream(self, req: RequestState, observer: RequestObserver | None = None
               ) -> AsyncGenerator[list[StreamDelta], None]:
        """Submit a prepared request; its deltas per step. Closing the iterator aborts it."""
        return stream_request(self.async_engine, self.output, req, observer)

    def abort(self, request_id: str) -> None:
        self.async_engine.abort(request_id)

    def stats(self) -> EngineStats:
        return engine_stats(self.engine)

    def model_info(self) -> ModelInfo:
        params = list(self.model.parameters())
        bits = {b for m in self.model.modules() if isinstance(b := getattr(m, "bits", None), int)}  # QuantLinear
        return ModelInfo(sum(p.numel() for p in params), min(bits) if bits else None,
                         str(params[0].dtype).removeprefix("torch."),
                         getattr(getattr(self.model, "device", None), "type", "cpu"))

    def shutdown(self) -> None:
        self.async_engine.shutdown()

    # -- the Python API -------------------------------------------------------------------------
    async def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None,
                              lora_request: LoRARequest | None = None) -> AsyncGenerator[StreamDelta, None]:
        """New text per sequence as it is generated; closing the iterator aborts the request."""
        async with aclosing(self._deltas(self.prepare(prompt, params, lora_request=lora_request))) as deltas:
            async for delta in deltas:
                yield delta

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       lora_request: LoRARequest | None = None) -> RequestOutput:
        req = self.prepare(prompt, params, lora_request=lora_request)
        async with aclosing(self.stream(req)) as steps:
            async for _ in steps:
                pass
        return self.output.result(req)

    async def chat_stream(self, messages: Messages, params: SamplingParams | None = None, *,
                          enable_thinking: bool | None = None, tools: list[dict] | None = None,
                          lora_request: LoRARequest | None = None, **template_kwargs: Any
                          ) -> AsyncGenerator[StreamDelta, None]:
        """Stream a conversation's answer, reasoning apart from content; messages may hold image/video parts."""
        prompt, ids, thinking, mm = self.render_chat(messages, enable_thinking, tools, **template_kwargs)
        split = DeltaSplitter(prompt)
        req = self.prepare(ids, self.chat_params(params, thinking), mm, lora_request)
        async with aclosing(self._deltas(req)) as deltas:
            async for delta in deltas:
                yield split(delta)

    async def _deltas(self, req: RequestState) -> AsyncGenerator[StreamDelta, None]:
        """`stream`, one delta at a time."""
        async with aclosing(self.stream(req)) as steps:
            async for deltas in steps:
                for delta in deltas:
                    yield delta


def engine_stats(engine: Engine) -> EngineStats:
    """The engine's public counters (read from another thread without locking: plain ints)."""
    # the engine thread changes `active` meanwhile: iterate over a copy, skip a sequence freed since
    held = [st for s in list(engine.active) if (st := s.state) is not None]
    return EngineStats(engine.num_waiting, engine.num_running, engine.prefix.hits, engine.prefix.hit_tokens,
                       engine.prefix.nbytes, engine.stats["preemptions"], engine.stats["prompt_tokens"],
                       engine.stats.get("spec_steps", 0), engine.stats.get("spec_drafted", 0),
                       engine.stats.get("spec_accepted", 0), requests_in_engine=len(engine.requests),
                       state_slots_used=engine.pool.num_slots - len(engine.pool.free_slots),
                       kv_cache_bytes=sum(st.kv_nbytes() for st in held), prefix_cache_budget=engine.prefix.budget)
