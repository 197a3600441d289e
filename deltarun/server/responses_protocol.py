"""Request bodies of the OpenAI Responses API (`/v1/responses`, `/v1/responses/input_tokens`) as pydantic
models, so wrong types become 400s and /openapi.json shows a body schema for each route.

As in protocol.py only the fields the server acts on are declared and unknown ones are accepted and
ignored. Input items stay plain dicts here: responses_input.py checks them one by one, naming the item
(`input[3].content[0]`) in its 400s, which a pydantic union of a dozen item types would not.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .protocol import Seed, Temperature, TopK, TopP, _Lenient


class ReasoningConfig(_Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: str | None = None


class _ResponsesInput(_Lenient):
    """What renders the prompt: shared by create and input_tokens."""

    model: str
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    conversation: str | dict[str, Any] | None = None  # the Conversations API is not served: 400 when set


class ResponsesRequest(_ResponsesInput):
    stream: bool = False
    store: bool | None = True
    background: bool | None = None  # no background mode: 400 when true
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None  # not in OpenAI's API; vLLM and llama.cpp take it
    seed: Seed | None = None
    ignore_eos: bool = False  # vLLM's extension, as on chat/completions
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None


class InputTokensRequest(_ResponsesInput):
    pass
