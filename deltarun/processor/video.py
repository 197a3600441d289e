"""Video clips → frames, grid and timestamps for the vision tower, as transformers' Qwen3-VL video processor.

PyAV decodes the file (mp4/webm/mkv/mov…; path, bytes, base64, data URL, http(s) when enabled). Frames
are sampled at `fps` (default 2) within [min_frames, max_frames] by the same rule as transformers
(`linspace(0, total−1, n).round()`), each kept frame is resized at once (torch uint8 bicubic with
antialias, the CPU path torchvision takes) to the size `smart_resize` gives for the whole clip, so only
the sampled frames at model resolution are ever held (uint8). Normalisation and patchify happen on
demand, whole (`pixel_values`) or in runs of temporal patches (`pixel_chunks`) for bounded memory.
Consecutive frame pairs form one temporal patch (an odd count repeats the last frame); each pair's
timestamp is the mean of its two frame times, shown in the prompt as `<{t:.1f} seconds>`.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .vision import MAX_IMAGE_PIXELS, patchify, read_media_bytes

MAX_VIDEO_BYTES = 1 << 30


@dataclass
class VideoProcessorConfig:
    """Settings of video_preprocessor_config.json (defaults: FACTS.md §7, Qwen3-VL-style stack)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 4096  # size.shortest_edge: over all sampled frames
    max_pixels: int = 25_165_824  # size.longest_edge: over all sampled frames
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    num_frames: int | None = None  # a fixed frame count instead of fps
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    max_frame_pixels: int = MAX_IMAGE_PIXELS
    allow_http: bool = False
    allow_private: bool = False  # fetch URLs on loopback/private/link-local addresses too (fetch.py)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "VideoProcessorConfig":
        size = d.get("size") or {}
        cfg = cls()
        for k in ("patch_size", "temporal_patch_size", "merge_size", "fps", "min_frames", "max_frames",
                  "num_frames", "cap_pixels_per_frame", "max_video_tokens"):
            if d.get(k) is not None:
                setattr(cfg, k, d[k])
        cfg.min_pixels = int(size.get("shortest_edge", d.get("min_pixels", cfg.min_pixels)))
        cfg.max_pixels = int(size.get("longest_edge", d.get("max_pixels", cfg.max_pixels)))
        cfg.image_mean = tuple(d.get("image_mean", cfg.image_mean))
        cfg.image_std = tuple(d.get("image_std", cfg.image_std))
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> "VideoProcessorConfig":
        path = Path(folder) / "video_preprocessor_config.json"
        return cls.from_dict(json.loads(path.read_text()) if path.exists() else {}, **overrides)


@dataclass
class ProcessedVideo:
    frames: torch.Tensor  # uint8 [F, C, H, W], resized; F a multiple of temporal_patch_size
    grid_thw: tuple[int, int, int]  # (F/Tp, H/P, W/P)
    timestamps: list[float]  # seconds, one per temporal patch
    frame_indices: list[int]  # sampled source frame numbers (before padding)
    fps: float  # the source's frame rate
    cfg: VideoProcessorConfig

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // self.cfg.merge_size ** 2

    def pixel_chunks(self, max_temporal: int | None = None) -> Iterator[tuple[torch.Tensor, tuple[int, int, int]]]:
        """Runs of ≤ max_temporal temporal patches: (pixel_values [tc·h·w, C·Tp·P·P], (tc, h, w))."""
        t, h, w = self.grid_thw
        tp = self.cfg.temporal_patch_size
        step = t if not max_temporal else max(1, max_temporal)
        for t0 in range(0, t, step):
            tc = min(step, t - t0)
            x = normalize_frames(self.frames[t0 * tp:(t0 + tc) * tp], self.cfg.image_mean, self.cfg.image_std)
            yield patchify(x, self.cfg.patch_size, self.cfg.merge_size, tp), (tc, h, w)

    @property
    def pixel_values(self) -> torch.Tensor:
        """[t·h·w, C·Tp·P·P] float32, all at once."""
        return torch.cat([pv for pv, _ in self.pixel_chunks()])


def sample_frame_indices(total: int, video_fps: float, cfg: VideoProcessorConfig) -> list[int]:
    """Frame numbers to keep: n = total/video_fps·fps clamped to [min_frames, max_frames] and ≤ total."""
    if total <= 0:
        raise ValueError("video has no frames")
    if cfg.num_frames is not None:
        n = min(int(cfg.num_frames), total)
    else:
        n = int(total / video_fps * cfg.fps)
        n = min(max(n, cfg.min_frames), cfg.max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def frame_timestamps(indices: list[int], video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds per temporal patch: the mean time of its first and last frame (last frame repeated)."""
    idx = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch_size)
    ts = [i / video_fps for i in idx]
    return [(ts[i] + ts[i + temporal_patch_size - 1]) / 2 for i in range(0, len(ts), temporal_patch_size)]


def timestamp_text(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 4096, max_pixels: int = 25_165_824) -> tuple[int, int]:
    """Target (h, w) for every frame: multiples of `factor`, t·h·w within [min_pixels, max_pixels]."""
    num_frames = max(num_frames, temporal_factor)  # a 1-frame clip is padded to one temporal patch
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"video aspect ratio {max(height, width) / min(height, width):.0f}:1 is too extreme")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(num_frames: int, height: int, width: int, cfg: VideoProcessorConfig) -> tuple[int, int]:
    factor = cfg.patch_size * cfg.merge_size
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        per_frame = max(min(cfg.max_video_tokens * factor * factor, cfg.max_pixels // num_frames),
                        int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    return smart_resize_video(num_frames, height, width, cfg.temporal_patch_size, factor, cfg.min_pixels, max_pixels)


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [F, C, H, W] → uint8 [F, C, h, w], bicubic with antialias (torchvision's CPU uint8 path)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames.contiguous(), size=list(size), mode="bicubic", align_corners=False, antialias=True)


def normalize_frames(frames: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [F, C, H, W] → float32 (x − 255·mean)/(255·std), the fused rescale+normalise of transformers."""
    m = torch.tensor(mean, dtype=torch.float32) * (1.0 / (1 / 255))
    s = torch.tensor(std, dtype=torch.float32) * (1.0 / (1 / 255))
    return frames.to(torch.float32).sub_(m.view(-1, 1, 1)).div_(s.view(-1, 1, 1))


def _open(raw):
    import av

    try:
        return av.open(str(raw) if isinstance(raw, Path) else io.BytesIO(raw), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read video (unsupported format, corrupt or truncated?): {e}") from None


def _frame_count(raw, stream_index: int) -> int:
    """Frames in a stream whose header lacks a count (webm/mkv): count packets, no decoding."""
    import av

    with _open(raw) as c:
        try:
            return sum(1 for p in c.demux(c.streams.video[stream_index]) if p.size)
        except av.FFmpegError as e:
            raise ValueError(f"cannot read video (corrupt or truncated?): {e}") from None


def load_video(source: str | bytes | bytearray | os.PathLike, cfg: VideoProcessorConfig | None = None
               ) -> ProcessedVideo:
    """Decode, sample and resize a clip → ProcessedVideo (frames uint8, grid, timestamps)."""
    import av

    cfg = cfg or VideoProcessorConfig()
    raw = read_media_bytes(source, allow_http=cfg.allow_http, max_bytes=MAX_VIDEO_BYTES, kind="video",
                           allow_private=cfg.allow_private)
    with _open(raw) as container:
        if not container.streams.video:
            raise ValueError("the file holds no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else 24.0
        total = int(stream.frames or 0) or _frame_count(raw, 0)
        indices = sample_frame_indices(total, video_fps, cfg)
        wanted, last = set(indices), indices[-1]
        stream.thread_type = "AUTO"
        kept: list[torch.Tensor] = []
        size = None
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i > last:
                    break
                if i not in wanted:
                    continue
                if frame.width * frame.height > cfg.max_frame_pixels or not frame.width or not frame.height:
                    raise ValueError(f"video frames are {frame.width}x{frame.height}, beyond the limit")
                if size is None:
                    size = target_size(len(indices), frame.height, frame.width, cfg)
                x = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None]
                kept.append(resize_frames(x, size))
        except av.FFmpegError as e:
            if not kept:
                raise ValueError(f"cannot decode video (corrupt or truncated?): {e}") from None
    if not kept:
        raise ValueError("video has no decodable frames")
    if len(kept) < len(indices):  # header over-counted frames, or the tail is damaged: keep what decoded
        indices = indices[:len(kept)]
    assert size is not None  # set with the first kept frame
    tp = cfg.temporal_patch_size
    kept += [kept[-1]] * (-len(kept) % tp)
    frames = torch.cat(kept)
    grid = (frames.shape[0] // tp, size[0] // cfg.patch_size, size[1] // cfg.patch_size)
    return ProcessedVideo(frames, grid, frame_timestamps(indices, video_fps, tp), indices, video_fps, cfg)
