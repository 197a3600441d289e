"""Driving one request through `AsyncLLM` for the HTTP handlers, and per-choice chat output parsing.

`run_request` is `AsyncLLM.generate_stream` with the request's state exposed (the handlers need the
new log-probs and token counts, which `StreamDelta` does not carry); closing it aborts the request.
`ChatChoice` turns one completion's text stream into reasoning, content and tool calls.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import Request

from ..async_llm import AsyncLLM
from ..inputs import MultiModalInput
from ..outputs import StreamDelta
from ..processor.output import RequestState
from ..processor.reasoning import ReasoningParser
from ..processor.tool_calls import ToolCall, ToolCallParser
from ..sampling import SamplingParams
from .metrics import METRICS

T = TypeVar("T")


def prepare(llm: AsyncLLM, prompt: str | list[int], params: SamplingParams,
            mm: MultiModalInput | None = None) -> RequestState:
    """Tokenize and validate (ValueError → 400) before any response byte is sent; `mm`: the prompt's media."""
    return llm.prepare(prompt, params, mm)


async def run_request(llm: AsyncLLM, req: RequestState) -> AsyncIterator[list[StreamDelta]]:
    """The request's deltas, step by step; leaving early (or cancellation) aborts it in the engine."""
    start = time.perf_counter()
    first = True
    METRICS.request_started()
    ok = False
    try:
        async with aclosing(llm.async_engine.generate(req.request_id, req.prompt_ids, req.params, req.mm)) as steps:
            async for step in steps:
                deltas = llm.output.update(req, step, llm.async_engine.finish)
                if first and any(d.token_ids for d in deltas):
                    METRICS.first_token(time.perf_counter() - start)
                    first = False
                yield deltas
                if req.finished:
                    break
        ok = True
    finally:
        METRICS.request_finished(time.perf_counter() - start, len(req.prompt_ids),
                                 sum(len(t.token_ids) for t in req.tracks), ok and req.finished)


async def run_to_end(llm: AsyncLLM, req: RequestState) -> None:
    async for _ in run_request(llm, req):
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (so the engine aborts it) if the client goes away meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


class ChatChoice:
    """One completion of a chat request: reasoning split off, then tool calls parsed out of the answer."""

    def __init__(self, in_think: bool, tools: list[dict] | None, prefix: str = ""):
        self.reasoning_parser = ReasoningParser(in_think=in_think)
        self.tool_parser = ToolCallParser(tools) if tools is not None else None
        self.prefix = prefix  # text forced into the prompt (tool_choice) that belongs to the answer
        self.calls: list[ToolCall] = []
        self.reasoning = ""
        self.content = ""

    def feed(self, text: str, final: bool) -> tuple[str, str, list[ToolCall]]:
        """(reasoning delta, content delta, new tool calls) for the next generated text."""
        if self.prefix:
            text, self.prefix = self.prefix + text, ""
        r, c = self.reasoning_parser.feed(text)
        if final:
            r2, c2 = self.reasoning_parser.finish()
            r, c = r + r2, c + c2
        calls: list[ToolCall] = []
        if self.tool_parser is not None:
            c, calls = self.tool_parser.feed(c)
            if final:
                c2, calls2 = self.tool_parser.finish()
                c, calls = c + c2, calls + calls2
        self.reasoning += r
        self.content += c
        self.calls += calls
        return r, c, calls


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them: tool-call arguments as dicts, text parts normalized.

    Image and video parts (`image`, `image_url`, `video`, `video_url`) pass through unchanged for
    `extract_media`, which also refuses any other part type."""
    import json

    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("role") == "developer":
            m["role"] = "system"
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind in ("text", "input_text") or (kind is None and "text" in part):
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                else:
                    parts.append(part)
            m["content"] = parts
        elif content is None:
            m["content"] = ""
        calls = []
        for tc in m.get("tool_calls") or []:
            fn = dict(tc.get("function", tc))
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    fn["arguments"] = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise ValueError(f"tool call arguments of {fn.get('name')!r} are not valid JSON") from None
            calls.append({"type": "function", "function": fn})
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


class ChatEvent:
    """What one step added to one choice of a chat request."""

    __slots__ = ("index", "reasoning", "content", "calls", "logprobs", "finish_reason", "token_count")

    def __init__(self, index: int, reasoning: str, content: str, calls: list[ToolCall], logprobs: list,
                 finish_reason: str | None, token_count: int):
        self.index, self.reasoning, self.content, self.calls = index, reasoning, content, calls
        self.logprobs, self.finish_reason, self.token_count = logprobs, finish_reason, token_count


async def chat_events(llm: AsyncLLM, req: RequestState, in_think: bool, tools: list[dict] | None,
                      prefix: str = "", max_calls: int | None = None) -> AsyncIterator[ChatEvent]:
    """Run a chat request, yielding parsed events per choice; finish_reason "tool_calls" when it called."""
    choices = [ChatChoice(in_think, tools, prefix) for _ in range(req.params.n)]
    sent = [0] * req.params.n
    async with aclosing(run_request(llm, req)) as steps:
        async for deltas in steps:
            for d in deltas:
                ch, track = choices[d.index], req.tracks[d.index]
                before = len(ch.calls)
                r, c, calls = ch.feed(d.text, d.finish_reason is not None)
                if max_calls is not None:
                    calls = calls[: max(0, max_calls - before)]
                    ch.calls = ch.calls[:max_calls]
                lps = track.logprobs[sent[d.index]:]
                sent[d.index] = len(track.logprobs)
                reason = d.finish_reason
                if reason == "stop" and ch.calls:
                    reason = "tool_calls"
                yield ChatEvent(d.index, r, c, calls, lps, reason, len(track.token_ids))
