"""OpenAI Responses API: `POST /v1/responses` (SSE or one JSON answer), `GET` / `DELETE /v1/responses/{id}`,
`GET /v1/responses/{id}/input_items` and `POST /v1/responses/input_tokens`.

A translation onto the chat path the other routes share (common.py, streaming.py): the input items become
chat messages (responses_input.py), the answer's reasoning, text and tool calls become output items
(responses_stream.py). No background mode (so no cancel) and no Files API. Stored responses live in
memory (responses_store.py); `previous_response_id` continues one, its prompt tokens reused as they were.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ..client import EngineClient
from ..processor.output import RequestState
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
from .responses_input import chat_tool_choice, function_tools, input_messages, output_messages, system_first
from .responses_protocol import InputTokensRequest, ResponsesRequest, _ResponsesInput
from .responses_store import StoredResponse
from .responses_stream import EventWriter, OutputStream, output_items
from .state import ServerState, deadline
from .streaming import chat_events, collect_chat, until_disconnect, with_error_event

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _effort(body: _ResponsesInput) -> str | None:
    return body.reasoning.effort if body.reasoning else None


async def _prompt(llm: EngineClient, state: ServerState, body: _ResponsesInput, max_out: int | None
                  ) -> tuple[ChatPrompt, list[dict[str, Any]], StoredResponse | None]:
    """(the prompt, the conversation it renders without instructions, the response it continues)."""
    if body.conversation is not None:
        raise APIError(400, "conversations are not served here; use previous_response_id", param="conversation")
    prev = state.responses.get(body.previous_response_id, "previous_response_id") if body.previous_response_id \
        else None
    new = input_messages(body.input)
    if not new and prev is None:
        raise APIError(400, "input must not be empty", param="input")
    conversation = (prev.messages if prev else []) + new
    tools, dropped = function_tools(body.tools)
    choice = chat_tool_choice(body.tool_choice, dropped)
    effort = _effort(body)
    thinking = effort not in ("none", "minimal") if effort else state.default_thinking
    messages = system_first(body.instructions, conversation)
    reuse = (prev.prompt_text, prev.prompt_ids) if prev and prev.prompt_text else None
    while True:
        prompt = await build_chat_prompt(llm, messages, thinking=thinking, tools=tools, tool_choice=choice,
                                         parallel=body.parallel_tool_calls is not False, reuse=reuse)
        try:
            check_length(llm, len(prompt.ids), max_out)
            return prompt, conversation, prev
        except APIError as e:
            if body.truncation != "auto":
                raise APIError(400, f"{e.message}; shorten the input or send truncation: 'auto' to drop the "
                               "oldest items", param="input", code=e.code) from None
            messages = _drop_oldest(messages)


def _drop_oldest(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """truncation 'auto': the conversation without its oldest turn (the system message stays; what is left
    starts at a user message, never at a call's output)."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(head) + 1:]
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    if not rest:
        raise APIError(400, "the input does not fit the context length even with the oldest items dropped",
                       param="input", code="context_length_exceeded")
    return head + rest


def _params(llm: EngineClient, body: ResponsesRequest, prompt: ChatPrompt) -> SamplingParams:
    params = sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                      max_tokens=body.max_output_tokens, ignore_eos=body.ignore_eos)
    fmt = body.text.format if body.text else None
    if not add_forced_call(llm, params, prompt) and fmt is not None:  # a forced call (tool_choice required/named) wins
        if fmt.type == "json_schema" and not isinstance(fmt.schema_, dict):
            raise APIError(400, "text.format.schema must be a JSON schema object", param="text.format.schema")
        try:
            params = add_structured(llm, params, fmt.type, fmt.schema_, prompt.thinking)
        except APIError as e:
            raise APIError(e.status, e.message, param="text.format") from None
    return add_thinking_budget(llm, params, effort_budget(_effort(body)), prompt)


def _usage(llm: EngineClient, req: RequestState, reasoning: str) -> dict[str, Any]:
    out = len(req.tracks[0].token_ids)
    thought = min(out, len(llm.tokenizer.encode(reasoning))) if reasoning else 0
    return {"input_tokens": len(req.prompt_ids),
            "input_tokens_details": {"cached_tokens": req.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": thought},
            "total_tokens": len(req.prompt_ids) + out}


class _Answer:
    """The response object of one request, in each of its states."""

    def __init__(self, body: ResponsesRequest, rid: str):
        self.body, self.rid, self.created = body, rid, int(time.time())

    def __call__(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else None
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": b.model,
            "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id,
            "reasoning": {"effort": _effort(b), "summary": b.reasoning.summary if b.reasoning else None},
            "store": b.store is not False, "temperature": b.temperature, "top_p": b.top_p,
            "text": {"format": fmt or {"type": "text"}}, "tool_choice": b.tool_choice or "auto",
            "tools": [t for t in b.tools or [] if t.get("type") == "function"],
            "truncation": b.truncation or "disabled", "usage": usage, "user": b.user, "metadata": b.metadata or {},
        }


def _input_items(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": raw}]}]
    prefixes = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}
    return [{**item, "id": item.get("id") or new_id(prefixes.get(str(item.get("type", "message")), "item_"))}
            for item in raw]


def _keep(state: ServerState, body: ResponsesRequest, response: dict[str, Any], prompt: ChatPrompt,
          conversation: list[dict[str, Any]]) -> None:
    if body.store is False:
        return
    reusable = prompt.mm is None
    state.responses.put(response["id"], StoredResponse(
        response, _input_items(body.input), conversation + output_messages(response["output"]),
        prompt.text if reusable else "", prompt.ids if reusable else []))


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    state = _state(request)
    if body.background:
        raise APIError(400, "background mode is not supported by this server", param="background")
    llm = await state.use(request, body.model)
    prompt, conversation, _ = await _prompt(llm, state, body, body.max_output_tokens)
    req = llm.prepare(prompt.ids, llm.chat_params(_params(llm, body, prompt), prompt.thinking), prompt.mm)
    events = chat_events(llm, req, prompt.in_think, prompt.tools, prompt.prefix, prompt.max_calls,
                         deadline(request))
    answer, summary = _Answer(body, new_id("resp_")), bool(body.reasoning and body.reasoning.summary)

    if not body.stream:
        total = (await until_disconnect(request, collect_chat(events, 1)))[0]
        status = "incomplete" if total.finish_reason == "length" else "completed"
        response = answer(status, output_items(total, summary, status), _usage(llm, req, total.reasoning))
        _keep(state, body, response, prompt, conversation)
        return response

    emit = EventWriter()
    out = OutputStream(emit, summary)

    async def lines() -> AsyncIterator[str]:
        yield emit("response.created", response=answer("in_progress", []))
        yield emit("response.in_progress", response=answer("in_progress", []))
        reasoning, finish = "", None
        async with aclosing(events) as evs:
            async for ev in evs:
                reasoning, finish = reasoning + ev.reasoning, ev.finish_reason or finish
                for line in out.feed(ev):
                    yield line
        status = "incomplete" if finish == "length" else "completed"
        for line in out.finish(status):
            yield line
        response = answer(status, out.items, _usage(llm, req, reasoning))
        _keep(state, body, response, prompt, conversation)
        yield emit(f"response.{status}", response=response)

    def failed(err_body: dict) -> str:
        """The stream's error event (the official client raises it), then response.failed."""
        err = err_body["error"]
        return (emit("error", code=err["code"] or err["type"], message=err["message"], param=err["param"])
                + emit("response.failed", response=answer("failed", out.items, error={
                    "code": "server_error" if err["type"] == "server_error" else (err["code"] or err["type"]),
                    "message": err["message"]})))

    return StreamingResponse(with_error_event(request, lines(), failed), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/responses/input_tokens")
async def input_tokens(body: InputTokensRequest, request: Request):
    state = _state(request)
    llm = await state.use(request, body.model)
    prompt, _, _ = await _prompt(llm, state, body, None)
    return {"object": "response.input_tokens", "input_tokens": len(prompt.ids)}


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    return _state(request).responses.get(response_id).response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    _state(request).responses.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request, order: Literal["asc", "desc"] = "desc",
                           limit: int = Query(20, ge=1, le=100), after: str | None = None):
    items = list(_state(request).responses.get(response_id).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
