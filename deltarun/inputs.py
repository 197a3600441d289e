"""What crosses the engine's boundary, below both the engine and the processor: a prompt's multimodal
input (`MultiModalInput`: M-RoPE positions, where the vision tokens sit, cache keys, and the items whose
pixels the engine runs through the vision tower) and what one engine step reports per request
(`StepOutput` of `SeqUpdate`s: token ids and logprobs, no text)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

MAX_ENCODE_PATCHES = 16384  # patches per vision-tower call for a video: bounds activation memory
TopLogprobs = list[tuple[int, float]]


class VisionItem(Protocol):
    """One decoded image or video (processor/multimodal.py `MediaItem`)."""

    kind: str
    grid_thw: tuple[int, int, int]
    digest: bytes

    def pixel_chunks(self, max_patches: int = MAX_ENCODE_PATCHES
                     ) -> Iterator[tuple[torch.Tensor, tuple[int, int, int]]]: ...


@dataclass(eq=False)
class MultiModalInput:
    """What the engine needs for a prompt with images/videos (items in prompt order)."""

    items: list[VisionItem]
    positions: torch.Tensor  # [3, P] int64: M-RoPE positions of the prompt
    delta: int  # position of token i ≥ P is i + delta on all three axes
    vision_index: torch.Tensor  # [N_vis] int64: prompt indices of the vision tokens, ascending
    key_ids: list[int]  # prompt ids with vision tokens replaced by their item's key value

    @property
    def num_prompt(self) -> int:
        return self.positions.shape[1]

    @property
    def num_vision_tokens(self) -> int:
        return self.vision_index.numel()

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """Positions [3, end − start] of inputs start … end−1 (prompt, then generated tokens)."""
        p = self.num_prompt
        parts = [self.positions[:, start:min(end, p)]]
        if end > p:
            lo = max(start, p)
            parts.append(torch.arange(lo + self.delta, end + self.delta).expand(3, -1))
        return torch.cat(parts, dim=1)

    def rows(self, start: int, end: int) -> tuple[int, int]:
        """The range [a, b) of vision-embedding rows whose tokens fall in inputs start … end−1."""
        bounds = torch.searchsorted(self.vision_index, torch.tensor([start, end]))
        return int(bounds[0]), int(bounds[1])


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
    cached_tokens: int | None = None  # set once, when the prefill completes: prompt tokens the prefix cache gave
    finished: bool = False
