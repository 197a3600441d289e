"""Grammar for a forced tool call (tool_choice "required" or a named function), in Qwen3.5's format.

`build_chat_prompt` already writes `<tool_call>\\n<function=` (and, for a named function, `NAME>\\n`) into
the prompt; this builds the llguidance Lark grammar for the rest of the block:

    NAME>\\n <parameter=P>\\nVALUE\\n</parameter>\\n ... </function>\\n</tool_call>

one call, parameters in the schema's order (required ones always, optional ones may be left out), and
every VALUE following its parameter's JSON schema the way `processor/tool_calls.py` reads it back:
string parameters as raw text (no quotes, no `<`, no newline at either end, at most `maxLength` or 256
characters), string enums
as one of their values, anything else as JSON (`%json{...}`). After `</tool_call>` only EOS is allowed.
"""
from __future__ import annotations

import json
from typing import Any

from ..processor.tokenizer import Tokenizer
from .structured import Structured, StructuredOutputError

CALL_END = "</tool_call>"
_MAX_STRING = 256


def _lit(s: str) -> str:
    return json.dumps(s)


def _value(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "%json{}"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(x, str) and x for x in enum):
        return " | ".join(_lit(x) for x in enum)
    if schema.get("type") == "string" and "enum" not in schema:
        n = schema.get("maxLength")
        n = n if isinstance(n, int) and 0 < n < _MAX_STRING else _MAX_STRING
        # no `<`; no newline at either end (the parser strips one there), so the value is never empty
        return "/[^<\\n]/" if n == 1 else f"/[^<\\n]([^<]{{0,{n - 2}}}[^<\\n])?/"
    return "%json" + json.dumps(schema)


def _function(tool: dict, idx: int, rules: list[str], with_name: bool) -> str:
    """Rule body for one function's call (after `<function=`); its parameter rules go into `rules`."""
    fn = tool.get("function", tool)
    params = fn.get("parameters")
    params = params if isinstance(params, dict) else {}
    props = params.get("properties")
    props = props if isinstance(props, dict) else {}
    required = params.get("required")
    required = required if isinstance(required, list) else []
    parts = [_lit(fn["name"] + ">\n")] if with_name else []
    for j, (name, schema) in enumerate(props.items()):
        rule = f"f{idx}_p{j}"
        rules.append(f"{rule}: {_lit(f'<parameter={name}>' + chr(10))} ({_value(schema)}) "
                     f"{_lit(chr(10) + '</parameter>' + chr(10))}")
        parts.append(rule if name in required else rule + "?")
    parts.append(_lit("</function>\n"))
    return " ".join(parts)


def tool_call_lark(tok: Tokenizer, tools: list[dict], forced: str | None) -> str:
    """Lark text for the forced call's continuation (`forced`: the named function, None: any tool)."""
    chosen = [t for t in tools if forced is None or t.get("function", t).get("name") == forced]
    rules: list[str] = []
    alts = [_function(t, i, rules, forced is None) for i, t in enumerate(chosen)]
    end_id = tok.token_to_id(CALL_END)
    end = f"<[{end_id}]>" if end_id is not None else _lit(CALL_END)
    return "\n".join([f"start: ({' | '.join(f'({a})' for a in alts)}) {end}", *rules])


def forced_tool_processors(tok: Tokenizer, tools: list[dict], prefix: str) -> list[Structured]:
    """`logits_processors` for a turn whose prompt ends with the forced call's opening `prefix`."""
    from llguidance import LLMatcher

    head = prefix.split("<function=", 1)[-1]
    forced = head[:-2] if head.endswith(">\n") else None
    try:
        grammar = LLMatcher.grammar_from_lark(tool_call_lark(tok, tools, forced))
        return [Structured(tok, grammar, thinking=False)]
    except (ValueError, StructuredOutputError) as e:
        raise StructuredOutputError(f"cannot constrain the tool call to the tool's schema: {e}") from None
