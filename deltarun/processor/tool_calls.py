"""Tool calls out of generated text: Qwen3.5's `<tool_call><function=NAME><parameter=P>` blocks.

`ToolCallParser` is streaming (`feed` pieces, then `finish`); `parse_tool_calls` is the same parser fed
the whole text at once, so streamed and non-streamed answers always agree. What it tolerates (see
reference/qwen3.5/tool_call_format.md and what the small models really write):
- text before the call (returned as content; whitespace next to a call is dropped),
- several calls in one answer, or several `<function=` blocks inside one `<tool_call>`,
- a bare `<function=...>...</function>` without the `<tool_call>` wrapper, a missing `</parameter>`,
- JSON-style calls inside `<tool_call>` (`{"name": ..., "arguments": {...}}`, Qwen3/Hermes style),
- parameter values converted by the tool's JSON schema (integers, numbers, booleans, null, objects,
  arrays; `True`/`None` Python spellings too); values of unknown parameters are kept as strings
  unless they are JSON objects/arrays,
- a call split anywhere across stream chunks.
A block that cannot be parsed is returned as content, verbatim: never a failed request, never lost text.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNC, FUNC_END = "<function=", "</function>"
PARAM, PARAM_END = "<parameter=", "</parameter>"
_MARKERS = (OPEN, FUNC)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def _schemas(tools: list[dict] | None) -> dict[str, dict]:
    """function name -> its `parameters.properties` (OpenAI tool dicts or bare function dicts)."""
    out: dict[str, dict] = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters") or {}
            out[fn["name"]] = params.get("properties") or {} if isinstance(params, dict) else {}
    return out


def _types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return [x for sub in schema[key] for x in _types(sub)]
    if "enum" in schema or "const" in schema:
        return ["string"] if all(isinstance(v, str) for v in schema.get("enum", [schema.get("const")])) else []
    return []


def _literal(value: str) -> Any:
    """JSON, else a Python literal (`True`, `{'a': 1}`), else raise ValueError."""
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        raise ValueError(value) from None


def convert_value(raw: str, schema: Any) -> Any:
    """A parameter's raw text as the type its schema asks for (the raw string when it does not fit)."""
    types = _types(schema)
    low = raw.strip().lower()
    if low in ("null", "none") and ("null" in types or types and "string" not in types):
        return None
    for t in [t for t in types if t != "string"] + (["string"] if "string" in types else []):
        try:
            if t == "string":
                return raw
            if t == "integer":
                v = _literal(raw.strip())
                if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
                    continue
                return int(v)
            if t == "number":
                v = _literal(raw.strip())
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                return v
            if t == "boolean":
                if low in ("true", "false"):
                    return low == "true"
                continue
            if t in ("object", "array"):
                v = _literal(raw.strip())
                if isinstance(v, dict if t == "object" else (list, tuple)):
                    return list(v) if isinstance(v, tuple) else v
        except (ValueError, OverflowError):
            continue
    if not types:  # no schema for it: keep text, but structured JSON values stay structured
        s = raw.strip()
        if s[:1] in "[{":
            try:
                return json.loads(s)
            except json.JSONDecodeError:
                pass
    return raw


def _strip_nl(value: str) -> str:
    """One newline after `<parameter=P>` and one before `</parameter>` belong to the format."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _parse_function(body: str, schemas: dict[str, dict]) -> ToolCall | None:
    """`NAME>` + parameters (the text after `<function=`), up to and without `</function>`."""
    end = body.find(">")
    if end <= 0:
        return None
    name = body[:end].strip()
    if not name or "\n" in name or "<" in name:
        return None
    props = schemas.get(name, {})
    args: dict[str, Any] = {}
    rest = body[end + 1 :]
    pieces = rest.split(PARAM)
    if pieces[0].strip():  # text between <function=...> and the first parameter: not this format
        return None
    for piece in pieces[1:]:
        close = piece.find(">")
        if close <= 0:
            return None
        pname = piece[:close].strip()
        value = piece[close + 1 :]
        stop = value.find(PARAM_END)
        if stop != -1:
            if value[stop + len(PARAM_END) :].strip():
                return None
            value = value[:stop]
        args[pname] = convert_value(_strip_nl(value), props.get(pname))
    return ToolCall(name, args)


def _parse_json_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def parse_block(body: str, schemas: dict[str, dict]) -> list[ToolCall] | None:
    """Calls inside one `<tool_call>` block (without its tags); None when it is not parseable."""
    body = body.strip()
    if body.startswith("{"):
        call = _parse_json_call(body)
        return [call] if call else None
    if not body.startswith(FUNC):
        return None
    calls = []
    for part in body.split(FUNC)[1:]:
        part = part.strip()
        if part.endswith(FUNC_END):
            part = part[: -len(FUNC_END)]
        elif FUNC_END in part:  # text after </function> inside the block
            return None
        call = _parse_function(part, schemas)
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _partial_suffix(buf: str) -> int:
    """Length of the longest suffix of buf that could still grow into a marker."""
    for k in range(min(max(len(m) for m in _MARKERS) - 1, len(buf)), 0, -1):
        if any(m.startswith(buf[-k:]) for m in _MARKERS):
            return k
    return 0


class ToolCallParser:
    """Streaming: `feed(text) -> (content_delta, new_calls)`; `finish()` the same for held-back text."""

    def __init__(self, tools: list[dict] | None = None):
        self.schemas = _schemas(tools)
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._block: str | None = None  # the opening marker while inside a call block
        self._after_call = False  # drop whitespace (and a stray </tool_call>) that follows a call

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        new: list[ToolCall] = []
        while True:
            if self._block is not None:
                closer = CLOSE if self._block == OPEN else FUNC_END
                end = self._buf.find(closer)
                if end == -1 and not final:
                    break
                raw = self._buf if end == -1 else self._buf[: end + len(closer)]
                self._buf = "" if end == -1 else self._buf[end + len(closer) :]
                body = raw[: -len(closer)] if end != -1 else raw
                # a block cut short (max_tokens) is only a call if its function is complete
                complete = end != -1 or (self._block == OPEN and (FUNC_END in body or body.strip()[:1] == "{"))
                calls = parse_block(body if self._block == OPEN else FUNC + body, self.schemas) if complete else None
                if calls is None:  # not a call after all: the text goes back to the user untouched
                    content.append(self._block + raw)
                    self._after_call = False
                else:
                    new.extend(calls)
                    self._after_call = True
                self._block = None
                continue
            if self._after_call:
                stripped = self._buf.lstrip()
                if not final and (not stripped or (CLOSE.startswith(stripped) and stripped != CLOSE)):
                    break  # wait: only whitespace so far, or maybe a stray </tool_call>
                if stripped.startswith(CLOSE):
                    stripped = stripped[len(CLOSE) :].lstrip()
                self._buf = stripped
                self._after_call = False
            hits = [(self._buf.find(m), m) for m in _MARKERS if m in self._buf]
            if hits:
                pos, marker = min(hits)
                content.append(self._buf[:pos].rstrip())
                self._buf = self._buf[pos + len(marker) :]
                self._block = marker
                continue
            if final:
                content.append(self._buf)
                self._buf = ""
                break
            keep = _partial_suffix(self._buf)
            head = self._buf[: len(self._buf) - keep]
            safe = head.rstrip()  # trailing whitespace is dropped if a call follows
            content.append(safe)
            self._buf = self._buf[len(safe) :]
            break
        self.calls.extend(new)
        return "".join(content), new


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a complete answer."""
    parser = ToolCallParser(tools)
    c1, calls1 = parser.feed(text)
    c2, calls2 = parser.finish()
    return c1 + c2, calls1 + calls2
