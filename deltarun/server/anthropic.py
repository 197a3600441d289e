"""Anthropic-compatible Messages API: `POST /v1/messages` (one JSON message, or Anthropic's SSE stream from
anthropic_stream.py) and `POST /v1/messages/count_tokens`, for Claude Code and the Anthropic SDKs.

A translation onto the server's shared chat path (common.py, streaming.py), as openai.py and ollama.py are:
the same model names and keep_alive, tool-call parser, reasoning split, structured output and media rules.
The conversion of blocks, tools and thinking signatures lives in anthropic_convert.py; errors come in
Anthropic's shape and statuses (errors.py chooses the shape by path).

`thinking`: enabled → thinking on, at most `budget_tokens` tokens of it (then `</think>` is forced);
adaptive → on, unbounded unless `output_config.effort` is low (1,024 tokens) or medium (4,096), as reasoning
effort is on the OpenAI routes; disabled → off; absent → the server's default (--think), as on the other routes.
`tool_choice` any/tool writes the opening of a call into the prompt and constrains it to the tool's schema,
as `required`/named do on chat completions (such turns skip thinking). `output_config.format` (or the beta's
`output_format`) json_schema goes through the structured-output path.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..client import EngineClient
from ..sampling import SamplingParams
from .anthropic_convert import (
    chat_messages,
    chat_tool_choice,
    chat_tools,
    sign,
    stop_reason,
    thinking_of,
    tool_use_block,
    usage,
)
from .anthropic_protocol import CountTokensRequest, MessagesRequest
from .anthropic_stream import message_stream, sse_error
from .common import (
    ChatPrompt,
    add_forced_call,
    add_structured,
    add_thinking_budget,
    build_chat_prompt,
    check_length,
    new_id,
    sampling,
)
from .state import ServerState, deadline
from .streaming import chat_events, collect_chat, until_disconnect, with_error_event

router = APIRouter()


async def _prompt(llm: EngineClient, body: CountTokensRequest, state: ServerState) -> tuple[ChatPrompt, int | None]:
    thinking, budget = thinking_of(body, state.default_thinking)
    choice, parallel = chat_tool_choice(body.tool_choice)
    prompt = await build_chat_prompt(llm, chat_messages(body), thinking=thinking, tools=chat_tools(body.tools),
                                     tool_choice=choice, parallel=parallel)
    return prompt, budget


def _params(llm: EngineClient, body: MessagesRequest, prompt: ChatPrompt, budget: int | None
            ) -> tuple[SamplingParams, bool]:
    """(sampling parameters, whether max_tokens was cut to the context left: the API's newer models take a
    max_tokens past the context window and stop with "model_context_window_exceeded", and Claude Code asks
    for 32k+ tokens whatever the prompt)."""
    check_length(llm, len(prompt.ids), None)
    room = llm.max_model_len - len(prompt.ids)
    params = sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, stop=body.stop_sequences,
                      max_tokens=min(body.max_tokens, room))
    fmt = body.output_config.format if body.output_config and body.output_config.format else body.output_format
    if not add_forced_call(llm, params, prompt) and fmt is not None:  # a forced call (tool_choice any/tool) wins
        params = add_structured(llm, params, "json_schema", fmt.schema_, prompt.thinking)
    return add_thinking_budget(llm, params, budget, prompt), body.max_tokens > room


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    state: ServerState = request.app.state.server
    llm = await state.use(request, body.model, body.keep_alive)
    prompt, budget = await _prompt(llm, body, state)
    params, capped = _params(llm, body, prompt, budget)
    req = llm.prepare(prompt.ids, llm.chat_params(params, prompt.thinking), prompt.mm)
    events = chat_events(llm, req, prompt.in_think, prompt.tools, prompt.prefix, prompt.max_calls,
                         deadline(request))
    mid = new_id("msg_")
    if body.stream:
        lines = message_stream(events, req, mid, body.model, body.stop_sequences, capped)
        return StreamingResponse(with_error_event(request, lines, sse_error), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    [total] = await until_disconnect(request, collect_chat(events, 1))
    content: list[dict[str, Any]] = []
    if total.reasoning:
        content.append({"type": "thinking", "thinking": total.reasoning, "signature": sign(total.reasoning)})
    if total.content:
        content.append({"type": "text", "text": total.content})
    content += [tool_use_block(c) for c in total.calls]
    reason, sequence = stop_reason(total.finish_reason, req.tracks[0].stop_reason, body.stop_sequences, capped)
    return {"id": mid, "type": "message", "role": "assistant", "model": body.model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence,
            "usage": usage(len(req.prompt_ids), req.cached_tokens, len(req.tracks[0].token_ids))}


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    state: ServerState = request.app.state.server
    llm = await state.use(request, body.model)
    prompt, _ = await _prompt(llm, body, state)
    return {"input_tokens": len(prompt.ids)}
