"""Streams for the HTTP handlers: the server's one call into a model, and per-choice chat output parsing.

`run_request` is `EngineClient.stream` with the server's metrics and the request's deadline
(`--request-timeout`) attached (the one request loop is deltarun/request_stream.py); closing it, or the
deadline passing, aborts the request in the engine. `ChatChoice` turns one completion's text
into reasoning (processor/reasoning.py), content and tool calls; `chat_events` runs a chat request as
per-choice `ChatEvent`s, which each API renders as its own stream, or adds up with `collect_chat`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from ..client import EngineClient
from ..outputs import LogprobDict, StreamDelta
from ..processor.output import RequestState
from ..processor.reasoning import ReasoningParser
from ..processor.tool_calls import ToolCall, ToolCallParser
from .errors import APIError, error_body, internal_error
from .metrics import METRICS

T = TypeVar("T")


def run_request(llm: EngineClient, req: RequestState, deadline: float | None = None
                ) -> AsyncGenerator[list[StreamDelta], None]:
    """The request's deltas, step by step, counted in the server's metrics; leaving early (or
    cancellation) aborts it in the engine. `deadline` (the event loop's clock, state.deadline): past it
    the request is aborted and a 408 `APIError` raised."""
    steps = llm.stream(req, METRICS)
    return steps if deadline is None else _until(steps, deadline)


async def _until(steps: AsyncGenerator[T, None], deadline: float) -> AsyncGenerator[T, None]:
    async with aclosing(steps):
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # cancels the wait inside `steps`: it aborts
                    item = await anext(steps)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise APIError(408, "the request ran longer than this server's --request-timeout and was ended",
                               code="request_timeout") from None
            yield item


async def run_to_end(llm: EngineClient, req: RequestState, deadline: float | None = None) -> None:
    async with aclosing(run_request(llm, req, deadline)) as steps:
        async for _ in steps:
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


async def with_error_event(request: Request, lines: AsyncIterator[str], render: Callable[[dict], str]
                           ) -> AsyncIterator[str]:
    """A response stream that ends with an error event in its API's shape (`render` of the error body)
    when producing it fails: the status line has gone out, so the error travels in the stream."""
    try:
        async with aclosing(lines) as chunks:  # type: ignore[type-var]  # closes the route's generator at once
            async for line in chunks:
                yield line
    except APIError as e:
        yield render(error_body(request, e.status, e.message, e.param, e.code))
    except Exception as e:  # a bug: logged with its traceback, the client gets a request id
        yield render(error_body(request, 500, internal_error(request, e)))


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
        r, c = self.reasoning_parser.feed(text, final)
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


class ChatEvent:
    """What one step added to one choice of a chat request."""

    __slots__ = ("index", "reasoning", "content", "calls", "logprobs", "finish_reason", "token_count")

    def __init__(self, index: int, reasoning: str, content: str, calls: list[ToolCall], logprobs: list[LogprobDict],
                 finish_reason: str | None, token_count: int):
        self.index, self.reasoning, self.content, self.calls = index, reasoning, content, calls
        self.logprobs, self.finish_reason, self.token_count = logprobs, finish_reason, token_count


async def chat_events(llm: EngineClient, req: RequestState, in_think: bool, tools: list[dict] | None,
                      prefix: str = "", max_calls: int | None = None, deadline: float | None = None
                      ) -> AsyncGenerator[ChatEvent, None]:
    """Run a chat request, yielding parsed events per choice; finish_reason "tool_calls" when it called."""
    choices = [ChatChoice(in_think, tools, prefix) for _ in range(req.params.n)]
    sent = [0] * req.params.n
    async with aclosing(run_request(llm, req, deadline)) as steps:
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


@dataclass
class ChoiceTotal:
    """One choice of a chat request added up (the non-streaming answer)."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[LogprobDict] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_ns: int | None = None  # perf_counter_ns when its first token arrived (Ollama's durations)

    def add(self, ev: ChatEvent) -> None:
        if self.first_token_ns is None and ev.token_count:
            self.first_token_ns = time.perf_counter_ns()
        self.reasoning += ev.reasoning
        self.content += ev.content
        self.calls += ev.calls
        self.logprobs += ev.logprobs
        self.finish_reason = ev.finish_reason or self.finish_reason


async def collect_chat(events: AsyncGenerator[ChatEvent, None], n: int) -> list[ChoiceTotal]:
    """Run `chat_events` to the end, adding up each of the `n` choices."""
    totals = [ChoiceTotal() for _ in range(n)]
    async with aclosing(events) as evs:
        async for ev in evs:
            totals[ev.index].add(ev)
    return totals
