"""What the engine tracks per request and per generated sequence, and what a step reports.

Token ids only: text, stop strings and templates are handled by the caller (processor/output.py).
A sequence's *inputs* are the prompt followed by its generated tokens; `num_computed` of them are in
its model state. A sequence is ready to decode when exactly one input (its newest token) is pending;
more pending means it must be prefilled first (a new prompt, or a preempted sequence recomputing).
A request with images/videos carries a `MultiModalInput` (inputs.py: positions, where its vision tokens are,
cache keys) and, while its prompt is being prefilled, the vision tower's output for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from ..cache.state import ModelCache, SeqState, StatePool
from ..inputs import MultiModalInput, StepOutput, TopLogprobs
from ..ops.sampling import SamplerState
from ..sampling import SamplingParams

if TYPE_CHECKING:
    from ..model.qwen3_5 import Qwen3_5ForCausalLM


@dataclass(eq=False)  # identity: two sequences are never "equal"
class Sequence:
    """One of the `n` completions of a request."""

    index: int
    request: "Request"
    sampler: SamplerState
    state: SeqState | None = None
    num_computed: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def inputs(self) -> list[int]:
        return self.request.prompt_ids + self.token_ids

    @property
    def key_salt(self) -> str | None:
        """What else the prefix cache keys this sequence's states by: its adapter (states differ per adapter)."""
        return self.request.adapter

    @property
    def key_inputs(self) -> list[int]:
        """`inputs` as the prefix cache keys them (vision tokens stand for their media's digest)."""
        return self.request.key_ids + self.token_ids

    @property
    def num_inputs(self) -> int:
        return len(self.request.prompt_ids) + len(self.token_ids)

    @property
    def prefill_target(self) -> int:
        """Inputs to compute before the next step samples (fresh prompt) or decodes (resumed)."""
        return len(self.request.prompt_ids) if not self.token_ids else self.num_inputs - 1

    @property
    def held_state(self) -> SeqState:
        """`state`, of a sequence that holds one (admitted and not yet freed: running, prefilling, decoding)."""
        assert self.state is not None, "the sequence holds no state"
        return self.state

    @property
    def decoding(self) -> bool:
        return self.state is not None and bool(self.token_ids) and self.num_computed == self.num_inputs - 1


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # with defaults filled
    max_len: int  # prompt + output may not exceed this (the context length)
    arrival: int = 0
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[TopLogprobs | None] = field(default_factory=list)
    mm: MultiModalInput | None = None
    vision_embeds: torch.Tensor | None = None  # [N_vis, H] while the prompt's vision tokens are prefilled
    adapter: str | None = None  # the adapter (LoRA) the request runs with; None: the base model
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of computed

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(s.finished for s in self.seqs)

    @property
    def key_ids(self) -> list[int]:
        return self.mm.key_ids if self.mm is not None else self.prompt_ids


class DecodeHost(Protocol):
    """What a decode strategy (the MTP speculator, speculative.py) uses of the runner that runs it: the model,
    the state pool, the counters, the usable vocabulary, a plain decode step and the stop check (which marks a
    sequence finished; the scheduler frees it after the step's phase)."""

    model: Qwen3_5ForCausalLM
    pool: StatePool
    stats: dict
    valid_vocab: int

    def plain_decode(self, seqs: list[Sequence], outputs: dict[str, StepOutput]) -> None: ...

    def run_model(self, seqs: list[Sequence], ids: torch.Tensor | None, cache: ModelCache, **kw) -> torch.Tensor: ...

    def check_stop(self, seq: Sequence, token: int) -> None: ...
