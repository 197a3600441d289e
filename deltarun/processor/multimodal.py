"""Multimodal requests: chat media parts → template placeholders → pixels, expanded ids, M-RoPE positions.

`extract_media` takes OpenAI-style content parts out of chat messages (`image`, `image_url`, `video`,
`video_url`) and leaves a bare `{"type": "image"|"video"}` part where each was, which the chat template
renders as one `<|vision_start|><|image_pad|><|vision_end|>` (or video) placeholder. After rendering and
tokenizing, `prepare_media` decodes the media (processor/vision.py, processor/video.py), expands the
placeholders, computes the 3-D positions and returns a `MultiModalInput`: everything the engine needs to
run the request — the items in prompt order, positions [3, P] and the decode offset `delta`, where each
vision token sits in the prompt, and the prefix-cache key ids (vision tokens replaced by a value derived
from their item's content digest, so the same image hits and a different one misses).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..inputs import MAX_ENCODE_PATCHES, MultiModalInput, VisionItem
from .mrope import VisionTokens, expand_placeholders, rope_index
from .video import ProcessedVideo, VideoProcessorConfig, load_video
from .vision import ImageProcessorConfig, ProcessedImage, preprocess_image

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class MediaRef:
    """One image or video named in a conversation (not decoded yet)."""

    kind: str  # "image" | "video"
    source: Any  # path, bytes, base64 text, data URL, PIL image (images)


_MEDIA_TYPES = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}


def _media_of(part: dict) -> MediaRef | None:
    """The media a content part names (None for text), by its `type` or, without one, by its keys."""
    ptype = part.get("type") or next((k for k in _MEDIA_TYPES if k in part), "text")
    if ptype == "text":
        return None
    kind = _MEDIA_TYPES.get(ptype)
    if kind is None:
        raise ValueError(f"unsupported content part type {ptype!r} (use text, image, image_url, video or video_url)")
    value = next((part[k] for k in (ptype, kind, kind + "_url") if part.get(k) is not None), None)
    if isinstance(value, dict):  # {"url": ...} as OpenAI and vLLM send it
        value = value.get("url")
    if value is None or (isinstance(value, (str, bytes)) and not value):
        raise ValueError(f"a {ptype} content part names no {kind} (give a path, bytes, base64 or a data URL)")
    return MediaRef(kind, value)


def extract_media(messages: Messages) -> tuple[Messages, list[MediaRef]]:
    """(messages with each media part replaced by a bare placeholder part, the media in message order)."""
    out: Messages = []
    media: list[MediaRef] = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise ValueError(f"content parts must be objects, got {type(part).__name__}")
            ref = _media_of(part)
            if ref is None:
                parts.append(part)
            else:
                media.append(ref)
                parts.append({"type": ref.kind})
        out.append({**msg, "content": parts})
    return out, media


@dataclass(eq=False)
class MediaItem:
    """One decoded image or video, ready for the vision tower."""

    kind: str
    grid_thw: tuple[int, int, int]
    digest: bytes  # blake2b of kind, grid and the model-resolution pixels
    image: ProcessedImage | None = None
    video: ProcessedVideo | None = None

    def pixel_chunks(self, max_patches: int = MAX_ENCODE_PATCHES
                     ) -> Iterator[tuple[torch.Tensor, tuple[int, int, int]]]:
        """(pixel_values, grid) runs; a video in runs of whole temporal patches (attention is per frame)."""
        if self.image is not None:
            yield self.image.pixel_values, self.grid_thw
        else:
            assert self.video is not None  # an item holds an image or a video
            _, h, w = self.grid_thw
            yield from self.video.pixel_chunks(max(1, max_patches // (h * w)))


def _digest(kind: str, grid: tuple[int, int, int], pixels: torch.Tensor, extra: Sequence[float] = ()) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{kind}:{grid}:{list(extra)}".encode())
    # ndarray has the buffer protocol; numpy's stubs declare __buffer__ only for Python ≥ 3.12
    h.update(pixels.contiguous().numpy().view("uint8"))  # type: ignore[arg-type]
    return h.digest()


def load_item(ref: MediaRef, image_cfg: ImageProcessorConfig, video_cfg: VideoProcessorConfig) -> MediaItem:
    """Decode one media reference (ValueError with a user-facing message for bad input)."""
    if ref.kind == "image":
        img = preprocess_image(ref.source, image_cfg)
        return MediaItem("image", img.grid_thw, _digest("image", img.grid_thw, img.pixel_values), image=img)
    vid = load_video(ref.source, video_cfg)
    return MediaItem("video", vid.grid_thw, _digest("video", vid.grid_thw, vid.frames, vid.timestamps), video=vid)


def key_value(digest: bytes) -> int:
    """A negative id standing for an item's vision tokens in prefix-cache keys (never a real token id)."""
    return -1 - int.from_bytes(digest[:7], "big")


def prepare_media(ids: Sequence[int], media: Sequence[MediaRef], encode: Callable[[str], list[int]],
                  tokens: VisionTokens, image_cfg: ImageProcessorConfig | None = None,
                  video_cfg: VideoProcessorConfig | None = None) -> tuple[list[int], MultiModalInput]:
    """Rendered prompt ids (one pad per item) + the media in message order → (expanded ids, MultiModalInput).

    Images and videos are matched to the pads of their kind in order (the template renders the
    messages in order); `encode` tokenizes the videos' timestamp text.
    """
    image_cfg, video_cfg = image_cfg or ImageProcessorConfig(), video_cfg or VideoProcessorConfig()
    pads = {tokens.image_token_id: "image", tokens.video_token_id: "video"}
    order = [pads[t] for t in ids if t in pads]
    for kind in ("image", "video"):
        n_pad, n_ref = order.count(kind), sum(1 for m in media if m.kind == kind)
        if n_pad != n_ref:
            raise ValueError(f"the prompt has {n_pad} {kind} placeholders but {n_ref} {kind}s were given")
    loaded: dict[str, list[MediaItem]] = {"image": [], "video": []}
    for kind in ("image", "video"):
        for i, ref in enumerate(m for m in media if m.kind == kind):
            try:
                loaded[kind].append(load_item(ref, image_cfg, video_cfg))
            except ValueError as e:
                raise ValueError(f"{kind} {i + 1}: {e}") from None
    images, videos = loaded["image"], loaded["video"]
    igrids, vgrids = [list(it.grid_thw) for it in images], [list(it.grid_thw) for it in videos]
    stamps = [it.video.timestamps for it in videos if it.video is not None]  # every video item has one
    full = expand_placeholders(list(ids), igrids, vgrids, stamps, encode, tokens)
    positions, delta = rope_index(full, igrids, vgrids, tokens)
    it_img, it_vid = iter(images), iter(videos)
    items: list[VisionItem] = [next(it_img) if kind == "image" else next(it_vid) for kind in order]
    vision_index = [i for i, t in enumerate(full) if t in pads]
    key_ids = list(full)
    per_item = iter(v for it in items for v in [key_value(it.digest)] * _count(it, tokens.merge_size))
    for i in vision_index:
        key_ids[i] = next(per_item)
    return full, MultiModalInput(items, positions, delta, torch.tensor(vision_index, dtype=torch.long), key_ids)


def _count(item: VisionItem, merge: int) -> int:
    t, h, w = item.grid_thw
    return t * h * w // merge ** 2
