"""Request bodies of the OpenAI and Ollama APIs as pydantic models (wrong types become 400s).

Only the fields the server acts on are declared; unknown fields are accepted and ignored, as the
real services do, so that clients sending newer fields keep working. The ranges the sampler accepts
(sampling.py `SamplingParams.validate`) are declared too, so the OpenAPI schema (/openapi.json) says
which bodies succeed: a value outside them is a 400 either way.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import MAX_LOGPROBS


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


# the sampler's ranges (sampling.py), shared by both APIs
Temperature = Annotated[float, Field(ge=0)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=-1, description="0 or -1: off")]
MinP = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Field(gt=0, description="1: off")]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]
Count = Annotated[int, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]
StopText = Annotated[str, Field(min_length=1)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


# -- OpenAI ----------------------------------------------------------------------------------------
class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _SamplingFields(_Lenient):
    model: str
    n: Annotated[int, Field(ge=1)] = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    stop: StopText | list[StopText] | None = None
    stop_token_ids: list[Count] | None = None
    max_tokens: Count | None = None
    min_tokens: Count = 0  # at most max_tokens (a 400 otherwise: JSON Schema cannot compare two fields)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None  # needs logprobs: true
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None  # a common shortcut some clients send at the top level
    thinking_budget: int | None = Field(None, ge=0)  # most reasoning tokens before </think> is forced


class CompletionRequest(_SamplingFields):
    prompt: (Text | Annotated[list[Text], Field(min_length=1)] | Annotated[list[Count], Field(min_length=1)]
             | Annotated[list[list[Count]], Field(min_length=1)])
    max_tokens: Count | None = 16  # OpenAI's default for legacy completions
    echo: bool = False
    logprobs: TopLogprobs | None = None
    suffix: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None


# -- Ollama ----------------------------------------------------------------------------------------
class OllamaOptions(_Lenient):
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    num_predict: int | None = None  # negative: no limit
    stop: list[StopText] | StopText | None = None
    seed: Seed | None = None
    repeat_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    num_ctx: int | None = None


class OllamaToolFunction(_Lenient):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(_Lenient):
    function: OllamaToolFunction


class OllamaMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class _OllamaCommon(_Lenient):
    model: str
    stream: bool = True
    think: bool | Literal["low", "medium", "high"] | None = None
    format: Literal["json"] | dict[str, Any] | Literal[""] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = None


class OllamaChatRequest(_OllamaCommon):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_OllamaCommon):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None
    context: list[int] | None = None


def one_of_names(*fields: str) -> dict[str, Any]:
    """JSON Schema for "at least one of `fields` names a model" (older clients send `name`, newer `model`)."""
    return {"anyOf": [{"required": [f], "properties": {f: {"type": "string", "minLength": 1}}} for f in fields]}


class OllamaShowRequest(_Lenient):
    model_config = ConfigDict(extra="allow", json_schema_extra=one_of_names("model", "name"))
    model: str | None = None
    name: str | None = None  # older clients
