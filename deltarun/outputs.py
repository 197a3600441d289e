"""Result types of the Python API, shaped like vLLM's offline API (`RequestOutput`, `CompletionOutput`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely; None when not computed
    decoded_token: str | None = None


LogprobDict = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[LogprobDict] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string, None for EOS

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[LogprobDict | None] | None
    outputs: list[CompletionOutput]
    finished: bool = False


@dataclass
class ChatCompletion:
    """One chat answer: the reasoning (thinking) apart from the answer text."""

    index: int
    content: str
    reasoning: str
    token_ids: list[int]
    finish_reason: str | None
    text: str = ""  # the raw generated text, reasoning and tags included


@dataclass
class ChatOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[ChatCompletion] = field(default_factory=list)

    @property
    def content(self) -> str:
        return self.outputs[0].content

    @property
    def reasoning(self) -> str:
        return self.outputs[0].reasoning


@dataclass
class StreamDelta:
    """New text of one completion in a stream (`index` tells which of the n)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    reasoning: str = ""  # chat streams: the thinking part of `text`
    content: str = ""  # chat streams: the answer part of `text`
