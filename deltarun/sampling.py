"""Sampling parameters for a request (shaped like vLLM's ``SamplingParams``) and the
Qwen3.5 model-card recommended sampling settings.

The batched tensor work that applies these parameters lives in ``deltarun/ops/sampling.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# The knobs that may be left ``None`` ("unset") so that the caller can fill model-card
# defaults, with the value each takes when nothing fills it: the one that leaves the
# distribution untouched.
NEUTRAL: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}

# More alternatives than this per token is a debugging aid, not an API feature (vLLM caps it too).
MAX_LOGPROBS = 20

# Temperatures below this are treated as greedy: dividing logits by ~0 would overflow fp32.
GREEDY_EPS = 1e-5

_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


def _is_int(v: Any) -> bool:
    # bool is an int subclass, but True as a token count is surely a caller's mistake.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


@dataclass
class SamplingParams:
    """Per-request sampling and stopping settings.

    Sampling knobs left ``None`` are "unset": call :meth:`with_defaults` to fill them from
    a model card (see :func:`card_defaults`) before sampling.  ``top_k`` of 0 or -1 means off;
    ``max_tokens`` None means until the context ends or a stop condition hits; ``logprobs`` is
    the number of top alternatives returned per generated token (0 = only the chosen token's).
    """

    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Factories of per-sequence logits masks (structured output): each sequence calls every factory
    # once and gets an object with `__call__(logits_row)` (masks in place) and `accept(token_id)`.
    logits_processors: list | None = None

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        self.validate()
        # Ints are accepted for float knobs (temperature=1); store floats so downstream
        # arithmetic and equality checks see one type.
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, float(v))

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message naming the first invalid field."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an int >= 1")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or not math.isfinite(v)):
                bad(name, "must be a finite number or None")
        if self.temperature is not None and self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < -1):
            bad("top_k", "must be an int >= 1, or 0 / -1 for off")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and not -2 <= v <= 2:
                bad(name, "must be in [-2, 2]")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            bad("seed", "must be an int in [-2**63, 2**64) or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            bad("max_tokens", "must be an int >= 0 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string, a list of them, or None")
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            bad("stop_token_ids", "must be a list of ints >= 0 or None")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be an int in [0, {MAX_LOGPROBS}] or None")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool")

    def with_defaults(self, defaults: dict[str, float | int]) -> SamplingParams:
        """Return a copy whose ``None`` fields are filled from ``defaults``, and whose sampling
        knobs still ``None`` after that are set to neutral values (temperature 1, top_p 1,
        top_k 0, min_p 0, presence/frequency 0, repetition 1).  Fields the caller set are
        never overridden.  Unknown keys in ``defaults`` raise ``ValueError`` (typos would
        otherwise silently do nothing)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(defaults) - names)
        if unknown:
            raise ValueError(f"with_defaults: unknown SamplingParams field(s) {unknown}")
        changes: dict[str, Any] = {}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                changes[name] = value
        for name, value in NEUTRAL.items():
            if getattr(self, name) is None and name not in changes:
                changes[name] = value
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0; unset is not greedy)."""
        return self.temperature is not None and self.temperature < GREEDY_EPS


# Model-card recommended settings, FACTS.md §5.  Text modes only except where named.
CARD_DEFAULTS: dict[str, dict[str, float | int]] = {
    # 4B (and, assumed, 9B) card "thinking, general"; the 0.8B/2B "thinking, text" row is identical.
    "thinking": {"temperature": 1.0, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                 "presence_penalty": 1.5, "repetition_penalty": 1.0},
    # All cards: thinking with precise coding (WebDev) -- also the 0.8B/2B "thinking, VL" row.
    "thinking_coding": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                        "presence_penalty": 0.0, "repetition_penalty": 1.0},
    # 0.8B/2B card "non-thinking, text".  Chosen as the non-thinking default because the small
    # models are this project's main target and that card was read in full; the 4B card's
    # "instruct, general" row differs (0.7 / 0.8 / 20 / 0 / 1.5 / 1) and is kept below.
    "non_thinking": {"temperature": 1.0, "top_p": 1.0, "top_k": 20, "min_p": 0.0,
                     "presence_penalty": 2.0, "repetition_penalty": 1.0},
    # 0.8B/2B "non-thinking, VL" row, which equals the 4B card's "instruct (non-thinking), general".
    "non_thinking_vl": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0,
                        "presence_penalty": 1.5, "repetition_penalty": 1.0},
}


def card_defaults(thinking: bool) -> dict[str, float | int]:
    """The recommended text-mode settings: the 4B card's general thinking row when ``thinking``,
    else the 0.8B/2B card's non-thinking text row (see the comments on ``CARD_DEFAULTS``).
    Returns a fresh dict the caller may modify."""
    return dict(CARD_DEFAULTS["thinking" if thinking else "non_thinking"])
