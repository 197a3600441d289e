"""What the OpenAI and Ollama adapters share: building a chat prompt (thinking, tools, tool_choice),
sampling parameters with structured output, and ids for responses.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from ..async_llm import AsyncLLM
from ..sampling import SamplingParams
from .app import APIError
from .runner import template_messages
from .structured import StructuredOutputError, make_structured


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass
class ChatPrompt:
    ids: list[int]
    thinking: bool
    in_think: bool  # the prompt leaves a think block open (reasoning comes first)
    tools: list[dict] | None  # tools whose calls are parsed out of the answer (None: no parsing)
    prefix: str  # answer text forced into the prompt by tool_choice
    max_calls: int | None  # 1 when parallel_tool_calls is false


def build_chat_prompt(llm: AsyncLLM, messages: list[dict[str, Any]], *, thinking: bool | None,
                      tools: list[dict] | None, tool_choice: Any = "auto", parallel: bool = True,
                      template_kwargs: dict[str, Any] | None = None) -> ChatPrompt:
    """Render the conversation. `tool_choice`: "auto" | "none" | "required" | {"function": {"name"}}.

    "none" leaves the tools out of the prompt (the model cannot call what it is not shown). "required"
    and a named function write the opening of the call into the prompt, so the model must call (a named
    one: that function); the think block is closed first, so such turns skip reasoning.
    """
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    kwargs = dict(template_kwargs or {})
    kwargs.pop("tools", None)
    if thinking is None and isinstance(kwargs.get("enable_thinking"), bool):
        thinking = kwargs["enable_thinking"]
    kwargs.pop("enable_thinking", None)
    forced = None
    if tools and tool_choice not in (None, "auto", "none", "required"):
        name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
        names = [t.get("function", t).get("name") for t in tools]
        if not isinstance(name, str) or name not in names:
            raise APIError(400, f"tool_choice names a function that is not in tools: {name!r}", param="tool_choice")
        forced = name
    elif tool_choice not in (None, "auto", "none", "required"):
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or a named function",
                       param="tool_choice")
    if tool_choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
    shown = tools if tools and tool_choice != "none" else None
    prompt, _, on = llm.render(template_messages(messages), thinking, shown, **kwargs)
    prefix = ""
    if shown and (tool_choice == "required" or forced):
        if prompt.endswith("<think>\n"):
            prompt += "\n</think>\n\n"  # what the template writes for an empty reasoning
        prefix = "<tool_call>\n<function=" + (f"{forced}>\n" if forced else "")
        prompt += prefix
    ids = llm.tokenizer.encode(prompt)
    return ChatPrompt(ids, on, prompt.endswith("<think>\n"), shown, prefix, None if parallel else 1)


def add_structured(llm: AsyncLLM, params: SamplingParams, kind: str | None, schema: dict | None,
                   thinking: bool) -> SamplingParams:
    """Attach the JSON grammar mask for `kind` ("json_object" | "json_schema"); None/"text" = free text."""
    if kind in (None, "text"):
        return params
    try:
        params.logits_processors = make_structured(llm.tokenizer, kind, schema, thinking)
    except StructuredOutputError as e:
        raise APIError(400, str(e), param="response_format") from None
    return params


def check_length(llm: AsyncLLM, n_prompt: int, max_tokens: int | None) -> None:
    """OpenAI's rule: prompt + max_tokens must fit the context (400 otherwise)."""
    ctx = llm.engine.max_model_len
    if n_prompt >= ctx:
        raise APIError(400, f"the prompt has {n_prompt} tokens but the context length is {ctx}",
                       param="messages", code="context_length_exceeded")
    if max_tokens is not None and n_prompt + max_tokens > ctx:
        raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context "
                       f"length {ctx}", param="max_tokens", code="context_length_exceeded")


def sampling(**fields: Any) -> SamplingParams:
    """SamplingParams from request fields; a bad value is a 400 naming the field."""
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except (ValueError, TypeError) as e:
        msg = str(e)
        param = msg.split(" ")[0].removeprefix("SamplingParams.") if msg.startswith("SamplingParams.") else None
        raise APIError(400, msg.replace("SamplingParams.", ""), param=param) from None
