"""Images → (pixel_values, grid_thw) for the vision tower, as transformers' Qwen3.5 image processor makes them.

`load_image` reads PNG/JPEG/WebP/GIF (first frame) from a path, bytes, base64 text, a data URL, or an
http(s) URL when explicitly allowed, and checks the size before decoding (decompression bombs). Then
`preprocess_image`: RGB (alpha composited on white) → `smart_resize` to multiples of patch·merge (32 px)
within [min_pixels, max_pixels] keeping the aspect ratio (PIL bicubic) → x/255 → (x − mean)/std →
patches `[h·w, C·Tp·P·P]` in 2×2 merge-block order, the single frame repeated Tp times. Every bad input
raises ValueError with a message a user can act on.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .fetch import fetch

ImageSource = Union[str, bytes, bytearray, os.PathLike, Image.Image]

FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF")
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own bomb threshold: larger images are refused before decoding
MAX_DOWNLOAD_BYTES = 64 << 20


@dataclass
class ImageProcessorConfig:
    """Settings of preprocessor_config.json (defaults: Qwen3-VL-style stack, see FACTS.md §7)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65_536
    max_pixels: int = 16_777_216
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    max_image_pixels: int = MAX_IMAGE_PIXELS
    allow_http: bool = False
    allow_private: bool = False  # fetch URLs on loopback/private/link-local addresses too (fetch.py)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "ImageProcessorConfig":
        size = d.get("size") or {}
        cfg = cls(patch_size=int(d.get("patch_size", 16)), temporal_patch_size=int(d.get("temporal_patch_size", 2)),
                  merge_size=int(d.get("merge_size", 2)),
                  min_pixels=int(size.get("shortest_edge", d.get("min_pixels", 65_536))),
                  max_pixels=int(size.get("longest_edge", d.get("max_pixels", 16_777_216))),
                  image_mean=tuple(d.get("image_mean", (0.5,) * 3)), image_std=tuple(d.get("image_std", (0.5,) * 3)))
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> "ImageProcessorConfig":
        """From `preprocessor_config.json` in a model folder when present, else the defaults."""
        path = Path(folder) / "preprocessor_config.json"
        return cls.from_dict(json.loads(path.read_text()) if path.exists() else {}, **overrides)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [h·w, C·Tp·P·P] float32
    grid_thw: tuple[int, int, int]  # (1, h, w) in patches
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size ** 2


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def read_media_bytes(source: str | bytes | bytearray | os.PathLike, allow_http: bool = False,
                     max_bytes: int = MAX_DOWNLOAD_BYTES, kind: str = "image", allow_private: bool = False
                     ) -> bytes | Path:
    """Raw bytes (or a local Path) for a media source: path, bytes, base64, data URL, http(s) URL (public
    addresses only unless `allow_private`: fetch.py)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, os.PathLike):
        return _existing(Path(source), kind)
    if not isinstance(source, str):
        raise ValueError(f"unsupported {kind} source of type {type(source).__name__}")
    s = source.strip()
    if not s:
        raise ValueError(f"empty {kind} source")
    if s.startswith("data:"):
        m = _DATA_URL.match(s)
        if not m:
            raise ValueError(f"malformed data URL for {kind}")
        if m.group("b64"):
            return _b64(m.group("data"), kind)
        return urllib.parse.unquote_to_bytes(m.group("data"))
    if s.startswith(("http://", "https://")):
        if not allow_http:
            raise ValueError(f"{kind} URLs (http/https) are disabled; pass a file, base64 data or a data URL "
                             "(or enable URL fetching)")
        return fetch(s, max_bytes, kind, allow_private)
    if s.startswith("file://"):
        return _existing(Path(urllib.request.url2pathname(s[7:])), kind)
    if len(s) < 4096 and _is_file(s):
        return Path(s).expanduser()
    if len(s) >= 8 and re.fullmatch(r"[A-Za-z0-9+/=_\-\s]+", s):
        return _b64(s, kind)
    raise ValueError(f"{kind} file not found: {s[:200]}")


def _is_file(s: str) -> bool:
    try:
        return Path(s).expanduser().is_file()
    except (OSError, ValueError):
        return False


def _existing(p: Path, kind: str) -> Path:
    if not p.is_file():
        raise ValueError(f"{kind} file not found: {p}")
    return p


def _b64(data: str, kind: str) -> bytes:
    data = re.sub(r"\s+", "", data)
    try:
        if "-" in data or "_" in data:  # URL-safe alphabet
            return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{kind} source is neither an existing file nor valid base64 data") from None


def load_image(source: ImageSource, allow_http: bool = False,
               max_image_pixels: int = MAX_IMAGE_PIXELS, allow_private: bool = False) -> Image.Image:
    """Decode an image source into an RGB PIL image (first frame of animations; alpha over white)."""
    if isinstance(source, Image.Image):
        img = source
    else:
        raw = read_media_bytes(source, allow_http=allow_http, kind="image", allow_private=allow_private)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
                img = Image.open(raw if isinstance(raw, Path) else io.BytesIO(raw))
                if img.format not in FORMATS:
                    raise ValueError(f"unsupported image format {img.format}; use PNG, JPEG, WebP or GIF")
                _check_size(img.width, img.height, max_image_pixels)
                img.seek(0)
                img.load()
        except (UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image: {e}") from None
        except (OSError, SyntaxError, EOFError) as e:  # truncated or corrupt data
            raise ValueError(f"cannot read image (corrupt or truncated?): {e}") from None
    _check_size(img.width, img.height, max_image_pixels)
    return to_rgb(img)


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise ValueError(f"image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ValueError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                         "(possible decompression bomb)")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers converts it: transparent pixels composited onto white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65_536,
                 max_pixels: int = 16_777_216) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is too extreme "
                         "(at most 200:1)")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalize_uint8(hwc: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [H, W, C] → float32 [C, H, W] = (x/255 − mean)/std, rounded like transformers' PIL path."""
    x = (hwc.astype(np.float64) * (1 / 255)).astype(np.float32)
    y = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(y.transpose(2, 0, 1)))


def patchify(frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """frames [F, C, H, W] (F a multiple of Tp) → [F/Tp · H/P · W/P, C·Tp·P·P] in merge-block order."""
    f, c, h, w = frames.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    gt, gh, gw = f // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, bh, bw, mh, mw, C, Tp, P, P
    return x.reshape(gt * gh * gw, c * tp * p * p)


def preprocess_image(image: ImageSource, cfg: ImageProcessorConfig | None = None) -> ProcessedImage:
    """One image source → ProcessedImage(pixel_values [h·w, C·Tp·P·P], grid_thw (1, h, w))."""
    cfg = cfg or ImageProcessorConfig()
    img = load_image(image, allow_http=cfg.allow_http, max_image_pixels=cfg.max_image_pixels,
                     allow_private=cfg.allow_private)
    rh, rw = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    chw = normalize_uint8(np.asarray(img), cfg.image_mean, cfg.image_std)
    frames = chw[None].expand(cfg.temporal_patch_size, -1, -1, -1)
    pv = patchify(frames, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    return ProcessedImage(pv, (1, rh // cfg.patch_size, rw // cfg.patch_size), cfg.merge_size)


def preprocess_images(images: list[ImageSource], cfg: ImageProcessorConfig | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Several images → (pixel_values [Σ h·w, C·Tp·P·P] float32, grid_thw [n, 3] int64)."""
    items = [preprocess_image(im, cfg) for im in images]
    if not items:
        raise ValueError("no images given")
    return torch.cat([it.pixel_values for it in items]), torch.tensor([it.grid_thw for it in items])
