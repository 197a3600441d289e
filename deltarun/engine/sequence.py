"""What the engine tracks per request and per generated sequence, and what a step reports.

Token ids only: text, stop strings and templates are handled by the caller (see `llm.py`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..cache.state import ModelCache
from ..ops.sampling import SamplerState
from ..sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # prompt (partly) not yet prefilled
    RUNNING = "running"  # decoding
    FINISHED = "finished"


TopLogprobs = list[tuple[int, float]]


@dataclass
class Sequence:
    """One of the `n` completions of a request."""

    index: int
    sampler: SamplerState
    cache: ModelCache | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # with defaults filled
    max_len: int  # prompt + output may not exceed this (the context length)
    seqs: list[Sequence] = field(default_factory=list)
    status: Status = Status.WAITING
    num_prefilled: int = 0
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[TopLogprobs | None] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass
class SeqUpdate:
    """New tokens for one sequence in one step."""

    index: int
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_top_logprobs: list[TopLogprobs]
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class StepOutput:
    """What one `step()` did for one request."""

    request_id: str
    updates: list[SeqUpdate]
    prompt_logprobs: list[float | None] | None = None  # set once, when the prefill completes
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    finished: bool = False
