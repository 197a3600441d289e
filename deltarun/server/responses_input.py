"""The Responses API's input onto the chat prompt the other routes build: input items → chat messages,
tools → function tools, tool_choice → the chat form, and output items back into messages (the stored
conversation a `previous_response_id` continues).

Everything here is pure translation; a shape the server cannot run is a 400 naming the item.
"""
from __future__ import annotations

import logging
from typing import Any

from .errors import APIError

log = logging.getLogger("deltarun.server")

_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text", "refusal")


def _text_of(content: Any, where: str) -> str:
    """Text content (a string or text parts) as one string; images are refused where only text can go."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", param=where)
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            raise APIError(400, f"{where}[{j}] must be a text part here", param=f"{where}[{j}]")
        out.append(str(part.get("text", part.get("refusal", ""))))
    return "".join(out)


def _parts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat parts: text and images (data URL or http URL; file ids → 400)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        here = f"{where}[{j}]"
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": _text_of([part], here)})
        elif kind == "input_image":
            if part.get("file_id") or not part.get("image_url"):
                raise APIError(400, f"{here}: this server has no Files API; send the image as a data URL in "
                               "image_url", param=here)
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_file":
            raise APIError(400, f"{here}: file inputs are not supported (no Files API on this server)", param=here)
        else:
            raise APIError(400, f"{here}: unsupported content part type {kind!r}", param=here)
    return parts


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for `input`: a string is one user message. Reasoning items sent back become the
    `reasoning_content` of the assistant turn that follows them; consecutive function calls join one
    assistant turn (the template writes them as one)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    reasoning: str | None = None

    def assistant() -> dict[str, Any]:
        nonlocal reasoning
        last = out[-1] if out else None
        if last is not None and last["role"] == "assistant" and reasoning is None:
            return last
        msg: dict[str, Any] = {"role": "assistant", "content": ""}
        if reasoning is not None:
            msg["reasoning_content"], reasoning = reasoning, None
        out.append(msg)
        return msg

    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role must be user, assistant, system or developer", param=where)
            if role == "assistant":
                msg = assistant()
                msg["content"] += _text_of(item.get("content"), where + ".content")
            elif role in ("system", "developer"):
                out.append({"role": "system", "content": _text_of(item.get("content"), where + ".content")})
            else:
                out.append({"role": "user", "content": _parts(item.get("content"), where + ".content")})
        elif kind == "function_call":
            name, args = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(args, str):
                raise APIError(400, f"{where}: a function_call needs a name and arguments (a JSON string)",
                               param=where)
            msg = assistant()
            msg.setdefault("tool_calls", []).append(
                {"id": item.get("call_id"), "type": "function", "function": {"name": name, "arguments": args}})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, where + ".output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "reasoning":
            texts = item.get("content") or item.get("summary") or []
            reasoning = (reasoning or "") + _text_of(texts, where + ".content")
        elif kind == "item_reference":
            raise APIError(400, f"{where}: item references are not supported; send the item itself", param=where)
        else:
            raise APIError(400, f"{where}: unsupported input item type {kind!r}", param=where)
    return out


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the conversation's next assistant turn."""
    return input_messages([{k: v for k, v in item.items() if k != "id"} for item in output])


def system_first(instructions: str | None, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`instructions` and every system/developer message as one leading system message (the template
    takes a system message only at the start); the rest in order."""
    texts = [instructions] if instructions else []
    texts += [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    rest = [m for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": "\n\n".join(texts)}] if texts else []) + rest


def function_tools(tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]] | None, set[str]]:
    """(chat-form function tools, the types of the tools dropped). Tools that run on OpenAI's side (web
    search, file search, computer use, ...) cannot run here: they are left out, with a warning in the log."""
    if not tools:
        return None, set()
    out, dropped = [], set()
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            dropped.add(str(kind))
            continue
        if not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools[{i}].name must be a string", param=f"tools[{i}].name")
        fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    if dropped:
        log.warning("responses: dropped tools this server cannot run: %s", ", ".join(sorted(dropped)))
    return out or None, dropped


def chat_tool_choice(choice: str | dict[str, Any] | None, dropped: set[str]) -> str | dict[str, Any]:
    """The Responses tool_choice in the chat form `build_chat_prompt` reads."""
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    kind = choice.get("type")
    if kind == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if kind == "allowed_tools":
        return choice.get("mode") or "auto"
    what = "a dropped tool" if kind in dropped else "a tool"
    raise APIError(400, f"tool_choice names {what} of type {kind!r} that this server cannot run; only function "
                   "tools run here", param="tool_choice")

