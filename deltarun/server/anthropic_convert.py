"""Anthropic Messages ↔ the server's chat form: a request's system/messages/tools/tool_choice/thinking as
`build_chat_prompt` takes them, and the pieces of an answer (content blocks, stop_reason, usage).

Thinking signatures: a `thinking` block's `signature` is an HMAC-SHA256 of its text under a secret made when
this process starts. A thinking block sent back whose signature checks out is fed into the conversation as
that assistant turn's reasoning (the chat template keeps it for turns after the last user message, i.e. in a
tool loop, as Anthropic does). One that does not check out (edited, from another server or an earlier run of
this one, or from Anthropic's API) is dropped, not refused: the client controls the whole prompt anyway, so
the signature only says "this is what the model thought", and a conversation carried over a server restart
keeps working. `redacted_thinking` blocks (never produced here) are dropped too.

tool_result blocks become `tool` messages (content as text, or text and image blocks); `is_error` prefixes
the text with "Error: ", as the chat template has no field for it. Document blocks, file sources and
server-side tools' blocks are refused with a 400; server tool definitions are dropped with a warning.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from typing import Any

from ..processor.tool_calls import ToolCall
from .anthropic_protocol import AnthropicTool, CountTokensRequest, ToolChoice
from .common import effort_budget, new_id
from .errors import APIError

log = logging.getLogger("deltarun.server")
_SECRET = secrets.token_bytes(32)  # per process: signatures do not outlive the server (see above)


def sign(thinking: str) -> str:
    return base64.b64encode(hmac.new(_SECRET, thinking.encode(), hashlib.sha256).digest()).decode()


def verified(thinking: str, signature: Any) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(thinking), signature)


def _refuse(message: str) -> APIError:
    return APIError(400, message, param="messages")


def _image(block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source") or {}
    kind = source.get("type")
    if kind == "base64":
        media_type = source.get("media_type") or "image/png"
        return {"type": "image", "image": f"data:{media_type};base64,{source.get('data') or ''}"}
    if kind == "url":
        return {"type": "image", "image": source.get("url")}  # http(s): only under --allow-http-media (common.py)
    raise _refuse(f"image source type {kind!r} is not supported (send base64 data or a URL; there is no Files API)")


def _parts(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Text and image blocks as chat content parts."""
    parts = []
    for b in blocks:
        kind = b.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(b.get("text", ""))})
        elif kind == "image":
            parts.append(_image(b))
        elif kind == "document":
            raise _refuse(f"document blocks are not supported in {where} (send the text as a text block)")
        else:
            raise _refuse(f"content block type {kind!r} is not supported in {where}")
    return parts


def _tool_result(block: dict[str, Any]) -> dict[str, Any]:
    content = block.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else _parts(content or [], "tool_result")
    if block.get("is_error"):
        parts = [{"type": "text", "text": "Error: "}, *parts]
    if all(p["type"] == "text" for p in parts):  # plain text reads best in the template's <tool_response>
        return {"role": "tool", "content": "".join(p["text"] for p in parts)}
    return {"role": "tool", "content": parts}


def _user(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A user turn: its tool_result blocks as tool messages, the rest as user messages, in order."""
    out: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for b in content:
        if b.get("type") == "tool_result":
            if pending:
                out.append({"role": "user", "content": _parts(pending, "user messages")})
                pending = []
            out.append(_tool_result(b))
        else:
            pending.append(b)
    if pending:
        out.append({"role": "user", "content": _parts(pending, "user messages")})
    return out


def _assistant(content: list[dict[str, Any]]) -> dict[str, Any]:
    text, reasoning, calls = [], [], []
    for b in content:
        kind = b.get("type")
        if kind == "text":
            text.append(str(b.get("text", "")))
        elif kind == "thinking":
            thought = str(b.get("thinking", ""))
            if verified(thought, b.get("signature")):
                reasoning.append(thought)
            else:
                log.info("a thinking block with a signature this server did not make was dropped")
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                raise _refuse("a tool_use block needs a name and an input object")
            calls.append({"id": b.get("id"), "function": {"name": b["name"], "arguments": b.get("input") or {}}})
        else:
            raise _refuse(f"content block type {kind!r} is not supported in assistant messages")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        msg["reasoning_content"] = "\n\n".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def chat_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as `build_chat_prompt` reads it (system first)."""
    out: list[dict[str, Any]] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "".join(
            str(b.get("text", "")) for b in body.system if b.get("type", "text") == "text")
        out.append({"role": "system", "content": system})
    for m in body.messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        elif m.role == "user":
            out += _user(m.content)
        else:
            out.append(_assistant(m.content))
    return out


def chat_tools(tools: list[AnthropicTool] | None) -> list[dict[str, Any]] | None:
    """Client tools as OpenAI-style function tools; server tools (web search, code execution...) cannot run
    here and are dropped with a warning (naming one in tool_choice is then a 400)."""
    out = []
    for t in tools or []:
        if t.type not in (None, "custom"):
            log.warning("tool %r of type %r is a server tool this server cannot run: dropped", t.name, t.type)
            continue
        fn: dict[str, Any] = {"name": t.name, "parameters": t.input_schema or {"type": "object", "properties": {}}}
        if t.description:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    return out or None


def chat_tool_choice(choice: ToolChoice | None) -> tuple[Any, bool]:
    """(build_chat_prompt's tool_choice, parallel calls allowed)."""
    if choice is None:
        return "auto", True
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, "tool_choice of type 'tool' needs a name", param="tool_choice")
        return {"function": {"name": choice.name}}, parallel
    return {"any": "required"}.get(choice.type, choice.type), parallel


def thinking_of(body: CountTokensRequest, default: bool | None) -> tuple[bool | None, int | None]:
    """(thinking on/off, budget in tokens or None for unbounded). No `thinking` field: off, as the Messages API
    means it (clients that want thinking ask for it), unless the server was started with --think/--no-think."""
    t = body.thinking
    if t is None:
        return bool(default), None
    if t.type == "disabled":
        return False, None
    if t.type == "enabled":
        if t.budget_tokens is None:
            raise APIError(400, "thinking.budget_tokens: Field required", param="thinking.budget_tokens")
        return True, t.budget_tokens
    effort = body.output_config.effort if body.output_config else None
    return True, effort_budget(effort)  # adaptive: unbounded, or the budget of output_config.effort low/medium


def stop_reason(finish: str | None, stop: int | str | None, stop_sequences: list[str] | None, capped: bool = False
                ) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from the engine's finish reason and what stopped it; `capped`: the token
    limit was the context left, not max_tokens."""
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return ("model_context_window_exceeded" if capped else "max_tokens"), None
    if isinstance(stop, str) and stop in (stop_sequences or []):
        return "stop_sequence", stop
    return "end_turn", None


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": new_id("toolu_"), "name": call.name, "input": call.arguments}


def usage(n_prompt: int, cached: int, n_output: int) -> dict[str, Any]:
    """Anthropic's usage: `input_tokens` are the prompt tokens not read from the (prefix) cache."""
    return {"input_tokens": n_prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": n_output}
