"""Ollama-compatible API: `/api/chat`, `/api/generate` (NDJSON streams by default), `/api/tags`,
`/api/show`, `/api/ps`, `/api/version`, with Ollama's field names, durations in ns and eval counts.
Models load on first request; `keep_alive` (per request) sets how long a model stays loaded afterwards,
and a chat/generate request without messages/prompt only loads the model (or unloads it, keep_alive 0).

Thinking goes to `message.thinking` (or `thinking` for generate) whenever the model thinks, and tool
calls to `message.tool_calls` with arguments as objects, as Ollama does for models it parses. `images`
(base64, per message or on /api/generate) come before the text of their message.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..client import EngineClient
from ..processor.output import RequestState
from ..sampling import SamplingParams
from ..store.info import parameter_counts
from .common import ChatPrompt, add_structured, build_chat_prompt, sampling
from .errors import APIError
from .manage import local_entries
from .model_manager import Loaded, is_unload
from .protocol import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions, OllamaShowRequest
from .state import ServerState, deadline
from .streaming import chat_events, collect_chat, until_disconnect, with_error_event

router = APIRouter()
VERSION = "0.12.0"  # the Ollama API version whose fields this mirrors; clients compare it


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _think(value: Any, default: bool | None) -> bool | None:
    return default if value is None else value is not False


def _content(text: str | None, images: list[str] | None) -> str | list[dict[str, Any]]:
    """A message's content: its images (base64) first, then its text, as chat content parts."""
    if not images:
        return text or ""
    return [{"type": "image", "image": b64} for b64 in images] + [{"type": "text", "text": text or ""}]


def _params(llm: EngineClient, options: OllamaOptions | None, fmt: Any, thinking: bool) -> SamplingParams:
    o = options or OllamaOptions()
    num_predict = o.num_predict if o.num_predict is None or o.num_predict >= 0 else None  # -1/-2: no limit
    params = sampling(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p, seed=o.seed,
                      stop=o.stop, max_tokens=num_predict, repetition_penalty=o.repeat_penalty,
                      presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty)
    if fmt == "json":
        return add_structured(llm, params, "json_object", None, thinking)
    if isinstance(fmt, dict):
        return add_structured(llm, params, "json_schema", fmt, thinking)
    return params


def _details(llm: EngineClient) -> dict[str, Any]:
    cfg = llm.config.text
    info = llm.model_info()
    try:  # from the config: quantized weights are not parameters
        params = parameter_counts(Path(str(llm.path)) / "config.json")["total"]
    except Exception:
        params = info.parameters
    level = f"INT{info.quant_bits}" if info.quant_bits else info.dtype.upper()
    return {"parent_model": "", "format": "safetensors", "family": "qwen35", "families": ["qwen35"],
            "parameter_size": f"{params / 1e9:.1f}B" if params >= 1e8 else f"{params / 1e6:.1f}M",
            "quantization_level": level, "context_length": cfg.max_position_embeddings}


async def _respond(request: Request, body: Any, llm: EngineClient, req: RequestState, prompt: ChatPrompt,
                   kind: str) -> Any:
    """Run a chat (kind "chat") or generate request; NDJSON lines when streaming, else one object."""
    start = time.perf_counter_ns()
    events = chat_events(llm, req, prompt.in_think, prompt.tools, prompt.prefix, deadline=deadline(request))

    def stats(first_ns: int | None, reason: str | None) -> dict[str, Any]:
        end = time.perf_counter_ns()
        first = first_ns or end
        load = request.scope.get("deltarun.load_ns", 0)
        out = {"done": True, "done_reason": reason or "stop", "total_duration": end - start + load,
               "load_duration": load,
               "prompt_eval_count": len(req.prompt_ids), "prompt_eval_duration": first - start,
               "eval_count": len(req.tracks[0].token_ids), "eval_duration": end - first}
        if kind == "generate":
            out["context"] = req.prompt_ids + req.tracks[0].token_ids
        return out

    def piece(reasoning: str, content: str, calls) -> dict[str, Any]:
        if kind == "generate":
            out: dict[str, Any] = {"response": content}
            if reasoning:
                out["thinking"] = reasoning
            return out
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            msg["thinking"] = reasoning
        if calls:
            msg["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return {"message": msg}

    head = lambda: {"model": body.model, "created_at": _now()}  # noqa: E731

    if body.stream:
        async def stream() -> AsyncIterator[str]:
            first_ns, reason = None, None
            async with aclosing(events) as evs:
                async for ev in evs:
                    if first_ns is None and ev.token_count:
                        first_ns = time.perf_counter_ns()
                    reason = ev.finish_reason or reason
                    if ev.reasoning or ev.content or ev.calls:
                        yield json.dumps({**head(), **piece(ev.reasoning, ev.content, ev.calls), "done": False}) + "\n"
            reason = "stop" if reason == "tool_calls" else reason
            yield json.dumps({**head(), **piece("", "", []), **stats(first_ns, reason)}) + "\n"

        return StreamingResponse(with_error_event(request, stream(), lambda e: json.dumps(e) + "\n"),
                                 media_type="application/x-ndjson")

    [total] = await until_disconnect(request, collect_chat(events, 1))
    reason = "stop" if total.finish_reason == "tool_calls" else total.finish_reason
    return {**head(), **piece(total.reasoning, total.content, total.calls), **stats(total.first_token_ns, reason)}


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request):
    state: ServerState = request.app.state.server
    if not body.messages and is_unload(body.keep_alive):  # Ollama's way to unload a model
        await state.models.unload_name(body.model)
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "unload"}
    llm = await state.use(request, body.model, body.keep_alive)
    messages = []
    for m in body.messages:
        d: dict[str, Any] = {"role": m.role, "content": _content(m.content, m.images)}
        if m.thinking:
            d["reasoning_content"] = m.thinking
        if m.tool_calls:
            d["tool_calls"] = [{"type": "function", "function": tc.function.model_dump()} for tc in m.tool_calls]
        messages.append(d)
    if not messages:  # Ollama answers an empty chat with a "loaded" message (clients use it to preload)
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    tools = body.tools or None
    prompt = await build_chat_prompt(llm, messages, thinking=_think(body.think, state.default_thinking), tools=tools)
    params = _params(llm, body.options, body.format, prompt.thinking)
    req = llm.prepare(prompt.ids, llm.chat_params(params, prompt.thinking), prompt.mm)
    return await _respond(request, body, llm, req, prompt, "chat")


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request):
    state: ServerState = request.app.state.server
    empty = not body.prompt and not body.context and not body.images
    if empty and is_unload(body.keep_alive):  # Ollama's way to unload a model
        await state.models.unload_name(body.model)
        return {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "unload"}
    llm = await state.use(request, body.model, body.keep_alive)  # loads it (a request with no prompt only loads)
    if body.images and body.raw:
        raise APIError(400, "images need the chat template: they cannot be sent with raw: true", param="images")
    pads = {llm.vision_tokens.image_token_id, llm.vision_tokens.video_token_id}
    if body.context and pads.intersection(body.context):
        raise APIError(400, "a context holding images cannot be continued; use /api/chat", param="context")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported")
    if empty:
        return {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load",
                "load_duration": request.scope["deltarun.load_ns"]}
    if body.raw:
        ids = list(body.context or []) + llm.tokenizer.encode(body.prompt)
        prompt = ChatPrompt(ids, False, False, None, "", None)
        params = _params(llm, body.options, body.format, False)
        req = llm.prepare(ids, params.with_defaults({}))
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [{"role": "user", "content": _content(body.prompt, body.images)}]
        prompt = await build_chat_prompt(llm, messages, thinking=_think(body.think, state.default_thinking),
                                         tools=None, context=body.context)
        params = _params(llm, body.options, body.format, prompt.thinking)
        req = llm.prepare(prompt.ids, llm.chat_params(params, prompt.thinking), prompt.mm)
    return await _respond(request, body, llm, req, prompt, "generate")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _loaded_entry(state: ServerState, entry: Loaded) -> dict[str, Any]:
    return {"name": entry.name, "model": entry.name, "size": entry.size, "digest": "",
            "modified_at": _iso(state.created), "details": _details(entry.llm)}


@router.get("/api/tags")
async def tags(request: Request):
    """Every model this server can run: the loaded ones, then the rest of what is local."""
    state: ServerState = request.app.state.server
    loaded = state.listed_loaded()
    out = [_loaded_entry(state, e) for e in loaded]
    names = {n for e in loaded for n in e.names}
    out += [m for m in await asyncio.to_thread(local_entries, state.models.served()) if m["name"] not in names]
    by_name = {m["name"]: m for m in out}
    for adapter, base in state.models.adapters.items():  # LoRA adapters: listed as their base, with its name
        if base in by_name:
            m = by_name[base]
            out.append({**m, "name": adapter, "model": adapter, "details": {**m["details"], "parent_model": base}})
    return {"models": out}


@router.get("/api/ps")
async def ps(request: Request):
    state: ServerState = request.app.state.server
    out = []
    for e in state.models.entries():
        if e.llm is None:
            continue
        on_gpu = e.llm.model_info().device != "cpu"
        out.append({**_loaded_entry(state, e), "expires_at": e.expires_at(), "size_vram": e.size if on_gpu else 0,
                    "context_length": e.llm.max_model_len})
    return {"models": out}


@router.post("/api/show")
async def show(body: OllamaShowRequest, request: Request):
    """A loaded model (its runtime template and dtype) or any other local model, from the store."""
    from .manage import folder_show, show_local

    state: ServerState = request.app.state.server
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required")
    base = state.models.adapters.get(name)
    if base is not None:  # a LoRA adapter: its base model's card, with the base as its parent
        out = await show(OllamaShowRequest(model=base), request)
        return {**out, "details": {**out["details"], "parent_model": base}}
    entry = state.models.find(name)
    if entry is None:
        served = state.models.served().get(name)  # the command-line model, unloaded for now
        if served:  # the command-line model, unloaded for now: its folder is the server's own choice
            return await asyncio.to_thread(show_local, str(served), True)
        return await asyncio.to_thread(show_local, name)  # 404: not local either
    llm = entry.llm
    caps = ["completion", "tools", "thinking"] + (["vision"] if llm.config.vision else [])
    details = _details(llm)
    out = folder_show(Path(str(llm.path)), details["quantization_level"].lower())
    out["details"] = {**out["details"], **details}
    out["model_info"]["general.parameter_count"] = out["model_info"]["general.parameter_count"] or \
        llm.model_info().parameters
    return {**out, "template": llm.template.source, "capabilities": caps, "modified_at": _iso(state.created)}


@router.get("/api/version")
async def version():
    return {"version": VERSION}
