"""Request bodies of Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) as pydantic models.

Lenient as protocol.py's models: only the fields the server acts on are declared, and unknown ones (new beta
fields, `cache_control` on blocks, `container`, `service_tier`, ...) are accepted and ignored. Content blocks
stay dicts: anthropic.py reads them by `type` and refuses the kinds it cannot serve (documents, files).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .protocol import StopText, Temperature, TopK, TopP, _Lenient


class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(_Lenient):
    name: str
    type: str | None = None  # None / "custom": a client tool; other types are Anthropic's server tools
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(_Lenient):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)  # the API's minimum of 1024 is not enforced: small models


class OutputFormat(_Lenient):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Lenient):
    format: OutputFormat | None = None
    effort: str | None = None


class CountTokensRequest(_Lenient):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's spelling


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)  # required, as the API demands
    stop_sequences: list[StopText] | None = None
    stream: bool = False
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    metadata: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None  # deltarun's: how long the model stays loaded afterwards
