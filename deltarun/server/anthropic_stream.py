"""Anthropic's Messages SSE stream from a chat request's events, event by event as the API sends it:

    message_start, ping,
    (content_block_start, content_block_delta..., content_block_stop) per block:
        thinking (thinking_delta..., then its signature_delta), text (text_delta...),
        tool_use (one input_json_delta with the whole input: calls are parsed whole),
    message_delta (stop_reason, stop_sequence, usage), message_stop.

message_start goes out at once, as the API sends it (a client shows progress from it; prefilling a long
prompt can take a while here), so its usage cannot yet say how many prompt tokens the prefix cache supplies:
it counts the whole prompt as input_tokens, and message_delta carries the final usage, cumulative, which the
SDK puts in place of the start's. A failure midway is an `event: error` with Anthropic's error body
(streaming.with_error_event).
"""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from ..processor.output import RequestState
from .anthropic_convert import sign, stop_reason, tool_use_block, usage
from .streaming import ChatEvent


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(body: dict) -> str:
    return sse("error", body)


class _Blocks:
    """The open content block and the events that open, fill and close blocks."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None
        self.thinking = ""

    def open(self, block: dict[str, Any]) -> list[str]:
        out = self.close()
        self.index += 1
        self.kind = block["type"]
        return out + [sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})]

    def delta(self, delta: dict[str, Any]) -> str:
        return sse("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        out = []
        if self.kind == "thinking":  # the signature comes last, once the whole thinking text is known
            out.append(self.delta({"type": "signature_delta", "signature": sign(self.thinking)}))
            self.thinking = ""
        self.kind = None
        return out + [sse("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def feed(self, ev: ChatEvent) -> list[str]:
        out: list[str] = []
        if ev.reasoning:
            if self.kind != "thinking":
                out += self.open({"type": "thinking", "thinking": "", "signature": ""})
            self.thinking += ev.reasoning
            out.append(self.delta({"type": "thinking_delta", "thinking": ev.reasoning}))
        if ev.content:
            if self.kind != "text":
                out += self.open({"type": "text", "text": ""})
            out.append(self.delta({"type": "text_delta", "text": ev.content}))
        for call in ev.calls:
            block = tool_use_block(call)
            out += self.open({**block, "input": {}})
            out.append(self.delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])}))
            out += self.close()
        return out


async def message_stream(events: AsyncGenerator[ChatEvent, None], req: RequestState, mid: str, model: str,
                         stop_sequences: list[str] | None, capped: bool) -> AsyncIterator[str]:
    blocks = _Blocks()
    finish: str | None = None
    message: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                               "stop_reason": None, "stop_sequence": None,
                               "usage": usage(len(req.prompt_ids), 0, 0)}
    yield sse("message_start", {"type": "message_start", "message": message})
    yield sse("ping", {"type": "ping"})
    async with aclosing(events) as evs:
        async for ev in evs:
            finish = ev.finish_reason or finish
            for line in blocks.feed(ev):
                yield line
    for line in blocks.close():
        yield line
    reason, sequence = stop_reason(finish, req.tracks[0].stop_reason, stop_sequences, capped)
    yield sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                "usage": usage(len(req.prompt_ids), req.cached_tokens, len(req.tracks[0].token_ids))})
    yield sse("message_stop", {"type": "message_stop"})
