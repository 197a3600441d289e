"""OpenAI-compatible chat: `POST /v1/chat/completions` (SSE streaming or one JSON answer).

Messages may hold images (`image_url` parts with a data URL or base64) and videos (`video_url` parts,
as vLLM takes them). Reasoning comes back as `reasoning_content` beside `content`; tool calls are
parsed out of the answer (never left in `content`) and streamed as `tool_calls` deltas, one whole call
per delta. The legacy `/v1/completions` and `/v1/models` live in openai_completions.py.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..client import EngineClient
from ..outputs import Logprob
from ..processor.tool_calls import ToolCall
from ..sampling import SamplingParams
from .common import (
    ChatPrompt,
    add_forced_call,
    add_structured,
    add_thinking_budget,
    build_chat_prompt,
    check_length,
    effort_budget,
    new_id,
    sampling,
)
from .errors import APIError
from .protocol import ChatCompletionRequest
from .state import ServerState, deadline
from .streaming import chat_events, collect_chat, until_disconnect, with_error_event

router = APIRouter()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_error(body: dict) -> str:
    """A stream's error (the official clients raise it), then the end of the stream, as vLLM sends them."""
    return sse(body) + "data: [DONE]\n\n"


def _thinking(body: ChatCompletionRequest, default: bool | None) -> bool | None:
    if body.reasoning_effort is not None:
        return body.reasoning_effort not in ("none", "minimal")
    if body.enable_thinking is not None:
        return body.enable_thinking
    kw = body.chat_template_kwargs or {}
    return kw.get("enable_thinking") if isinstance(kw.get("enable_thinking"), bool) else default


def _lp_entry(tok_id: int, lp: Logprob, tokenizer) -> dict[str, Any]:
    return {"token": lp.decoded_token or "", "logprob": max(lp.logprob, -9999.0),
            "bytes": list(tokenizer.id_to_token_bytes(tok_id))}


def chat_logprobs(entries: list[dict[int, Logprob]], k: int, tokenizer) -> list[dict[str, Any]]:
    out = []
    for d in entries:
        tok, chosen = next(iter(d.items()))
        top = sorted(((t, v) for t, v in d.items() if v.rank is not None), key=lambda x: cast(int, x[1].rank))[:k]
        out.append({**_lp_entry(tok, chosen, tokenizer),
                    "top_logprobs": [_lp_entry(t, v, tokenizer) for t, v in top]})
    return out


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out = {"id": new_id("call_"), "type": "function",
           "function": {"name": call.name, "arguments": call.arguments_json}}
    return out if index is None else {"index": index, **out}


def _params(llm: EngineClient, body: ChatCompletionRequest, prompt: ChatPrompt) -> SamplingParams:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    check_length(llm, len(prompt.ids), max_tokens)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    params = sampling(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                      min_p=body.min_p, presence_penalty=body.presence_penalty,
                      frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                      seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids, max_tokens=max_tokens,
                      min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                      logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    rf = body.response_format
    if add_forced_call(llm, params, prompt):
        return params
    if rf is not None and rf.type == "json_schema":
        schema = (rf.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format")
        return add_structured(llm, params, "json_schema", schema, prompt.thinking)
    return add_structured(llm, params, rf.type if rf else None, None, prompt.thinking)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.server
    llm = await state.use(request, body.model)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    prompt = await build_chat_prompt(llm, [m.model_dump() for m in body.messages],
                                     thinking=_thinking(body, state.default_thinking), tools=tools,
                                     tool_choice=body.tool_choice or "auto", parallel=body.parallel_tool_calls,
                                     template_kwargs=body.chat_template_kwargs)
    budget = body.thinking_budget if body.thinking_budget is not None else effort_budget(body.reasoning_effort)
    params = add_thinking_budget(llm, _params(llm, body, prompt), budget, prompt)
    req = llm.prepare(prompt.ids, llm.chat_params(params, prompt.thinking), prompt.mm)
    rid, created = new_id("chatcmpl-"), int(time.time())
    events = chat_events(llm, req, prompt.in_think, prompt.tools, prompt.prefix, prompt.max_calls,
                         deadline(request))
    k = body.top_logprobs or 0
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}

    def usage() -> dict[str, Any]:
        gen = sum(len(t.token_ids) for t in req.tracks)
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": gen,
                "total_tokens": len(req.prompt_ids) + gen,
                "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}

    if body.stream:
        async def stream() -> AsyncIterator[str]:
            calls_sent = [0] * body.n
            async with aclosing(events) as evs:
                for i in range(body.n):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                async for ev in evs:
                    delta: dict[str, Any] = {}
                    if ev.reasoning:
                        delta["reasoning_content"] = ev.reasoning
                    if ev.content:
                        delta["content"] = ev.content
                    if ev.calls:
                        delta["tool_calls"] = [tool_call_json(c, calls_sent[ev.index] + j)
                                               for j, c in enumerate(ev.calls)]
                        calls_sent[ev.index] += len(ev.calls)
                    lps = {"content": chat_logprobs(ev.logprobs, k, llm.tokenizer)} \
                        if body.logprobs and ev.logprobs else None
                    if delta or lps or ev.finish_reason:
                        yield sse({**head, "choices": [{"index": ev.index, "delta": delta, "logprobs": lps,
                                                        "finish_reason": ev.finish_reason}]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(with_error_event(request, stream(), sse_error), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    totals = await until_disconnect(request, collect_chat(events, body.n))
    choices = []
    for i, a in enumerate(totals):
        msg: dict[str, Any] = {"role": "assistant", "content": a.content or (None if a.calls else ""),
                               "reasoning_content": a.reasoning or None}
        if a.calls:
            msg["tool_calls"] = [tool_call_json(c) for c in a.calls]
        choices.append({"index": i, "message": msg, "finish_reason": a.finish_reason,
                        "logprobs": {"content": chat_logprobs(a.logprobs, k, llm.tokenizer)}
                        if body.logprobs else None})
    return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": choices, "usage": usage()}
