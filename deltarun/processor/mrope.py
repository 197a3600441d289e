"""Prompt assembly for images and videos: placeholder expansion and 3-D M-RoPE position ids.

Pure functions over token ids and grids (no model, no tokenizer object: text is encoded through a
callable). The chat template writes one `<|image_pad|>` / `<|video_pad|>` per item; `expand_placeholders`
turns an image's into t·h·w/merge² pads and a video's into, per temporal patch,
`<{t:.1f} seconds><|vision_start|>` + pads + `<|vision_end|>` (inside the template's own start/end, as
transformers' Qwen3-VL processor does). `rope_index` then gives the (temporal, height, width) position of
every token exactly as transformers' `Qwen3_5Model.get_rope_index`: text advances all three axes by 1;
each run of vision tokens (one image, or one video frame) starts at the running position p and takes
(p, p+row, p+col); the text after it resumes at p + max(h, w)/merge. Tokens after the prompt (decode)
use position i + delta on all three axes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Grid = Sequence[int]  # (t, h, w) in patches


@dataclass(frozen=True)
class VisionTokens:
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    merge_size: int = 2

    @classmethod
    def from_config(cls, config) -> "VisionTokens":
        """From a deltarun ModelConfig (top-level ids and vision_config.spatial_merge_size)."""
        d = cls()
        return cls(image_token_id=config.image_token_id or d.image_token_id,
                   video_token_id=config.video_token_id or d.video_token_id,
                   vision_start_token_id=config.vision_start_token_id or d.vision_start_token_id,
                   vision_end_token_id=config.vision_end_token_id or d.vision_end_token_id,
                   merge_size=int((config.vision or {}).get("spatial_merge_size", 2)))


def _rows(grids) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    rows = grids.tolist() if torch.is_tensor(grids) else grids
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def expand_placeholders(ids: Sequence[int], image_grids=None, video_grids=None,
                        video_timestamps: Sequence[Sequence[float]] | None = None,
                        encode: Callable[[str], list[int]] | None = None,
                        tokens: VisionTokens = VisionTokens()) -> list[int]:
    """Token ids with each single image/video pad expanded to its item's tokens (items in prompt order).

    image_grids / video_grids: [n, 3] (t, h, w) per item; video_timestamps: seconds per temporal patch
    of each video; encode: text → ids, used for the video timestamps (special tokens split the text,
    so encoding the timestamp alone gives the ids it has inside the full prompt).
    """
    images, videos = _rows(image_grids), _rows(video_grids)
    n_img = sum(1 for i in ids if i == tokens.image_token_id)
    n_vid = sum(1 for i in ids if i == tokens.video_token_id)
    if n_img != len(images):
        raise ValueError(f"prompt has {n_img} image placeholders but {len(images)} images were given")
    if n_vid != len(videos):
        raise ValueError(f"prompt has {n_vid} video placeholders but {len(videos)} videos were given")
    if videos and (encode is None or video_timestamps is None or len(video_timestamps) != len(videos)):
        raise ValueError("videos need their timestamps and an `encode` function for the timestamp text")
    m2 = tokens.merge_size ** 2
    out: list[int] = []
    ii = vi = 0
    for tok in ids:
        if tok == tokens.image_token_id:
            t, h, w = images[ii]
            out += [tok] * (t * h * w // m2)
            ii += 1
        elif tok == tokens.video_token_id:
            assert video_timestamps is not None and encode is not None  # checked above (videos is non-empty)
            t, h, w = videos[vi]
            ts = video_timestamps[vi]
            if len(ts) != t:
                raise ValueError(f"video {vi} has {t} temporal patches but {len(ts)} timestamps")
            for k in range(t):
                out += encode(f"<{ts[k]:.1f} seconds>")
                out += [tokens.vision_start_token_id] + [tok] * (h * w // m2) + [tokens.vision_end_token_id]
            vi += 1
        else:
            out.append(tok)
    return out


def mm_token_types(ids: Sequence[int], tokens: VisionTokens = VisionTokens()) -> list[int]:
    """0 text, 1 image pad, 2 video pad (transformers' mm_token_type_ids)."""
    return [1 if i == tokens.image_token_id else 2 if i == tokens.video_token_id else 0 for i in ids]


def rope_index(ids: Sequence[int], image_grids=None, video_grids=None,
               tokens: VisionTokens = VisionTokens()) -> tuple[torch.Tensor, int]:
    """M-RoPE positions for an expanded prompt: (positions [3, T] int64, delta) with delta = max + 1 − T.

    image_grids / video_grids: [n, 3] (t, h, w) per item in prompt order. A video contributes one
    (1, h, w) grid per temporal patch, since its frames are separated by timestamps in the prompt.
    """
    m = tokens.merge_size
    grids = {1: iter(_rows(image_grids)),
             2: iter([(1, h, w) for t, h, w in _rows(video_grids) for _ in range(t)])}
    types = mm_token_types(ids, tokens)
    parts: list[torch.Tensor] = []
    pos, i, n = 0, 0, len(types)
    while i < n:
        j = i
        while j < n and types[j] == types[i]:
            j += 1
        if types[i] == 0:
            parts.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        else:
            kind = "image" if types[i] == 1 else "video frame"
            try:
                t, h, w = next(grids[types[i]])
            except StopIteration:
                raise ValueError(f"more {kind} token runs in the prompt than {kind} grids") from None
            gh, gw = h // m, w // m
            if t * gh * gw != j - i:
                raise ValueError(f"a run of {j - i} {kind} tokens does not match its grid {(t, h, w)} "
                                 f"({t * gh * gw} tokens)")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(h, w) // m
        i = j
    for grid_type, it in grids.items():
        if next(it, None) is not None:
            raise ValueError(f"more {'image' if grid_type == 1 else 'video frame'} grids than token runs in the prompt")
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - n if n else 0
    return positions, delta


def decode_positions(start: int, length: int, delta: int) -> torch.Tensor:
    """Positions [3, length] of tokens start … start+length−1 after a multimodal prompt."""
    return torch.arange(start + delta, start + delta + length).expand(3, -1).clone()
