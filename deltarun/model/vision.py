"""The Qwen3.5 vision tower (`model.visual.*`) and the scatter of its output into token embeddings.

Input is what the processors make: flattened patches `[N, C·Tp·P·P]` (N = Σ t·h·w over the items, each
item's patches in 2×2 merge-block order) plus `grid_thw [n_items, 3]`. Per patch: a Conv3d patch
embedding (kernel = stride = Tp×P×P, so computed as one matmul), plus the learned square position table
bilinearly resampled (align_corners=True) to the item's h×w grid, then pre-LayerNorm blocks with 2-D
rotary attention and a gelu-tanh MLP, then the merger (LayerNorm → 2×2 concat → fc1 → GELU → fc2) to
the text hidden size. Attention never crosses a frame: each temporal patch of each item is its own
sequence (as in transformers), so frames are independent and long videos are encoded in bounded chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import full_attention
from .layers import embedding

if TYPE_CHECKING:
    from .qwen3_5 import Qwen3_5ForCausalLM


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        rope = d.get("rope_parameters") or {}
        return cls(depth=int(d["depth"]), hidden_size=int(d["hidden_size"]), num_heads=int(d["num_heads"]),
                   intermediate_size=int(d["intermediate_size"]), out_hidden_size=int(d["out_hidden_size"]),
                   patch_size=int(d.get("patch_size", 16)), temporal_patch_size=int(d.get("temporal_patch_size", 2)),
                   spatial_merge_size=int(d.get("spatial_merge_size", 2)), in_channels=int(d.get("in_channels", 3)),
                   num_position_embeddings=int(d.get("num_position_embeddings", 2304)),
                   hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
                   rope_theta=float(rope.get("rope_theta", 10000.0)))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def _act(name: str):
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported vision hidden_act {name!r}")


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C·Tp·P·P] → [N, hidden]. A stride=kernel Conv3d over one patch is a matmul."""
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: int) -> torch.Tensor:
        """x [N, C] holding `frames` equal-length frame sequences; cos/sin [N, D] fp32 → [N, C]."""
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, -1)
        v = qkv[:, 2]  # [N, H, D]
        # q and k rotated together in fp32, in place (one widening copy; 16 → 6 passes over them)
        qk = qkv[:, :2].float()
        rotated = _rotate_half(qk)
        qk = qk.mul_(cos[:, None, None, :]).addcmul_(rotated, sin[:, None, None, :])
        q, k = qk.to(v.dtype).unbind(1)
        # [frames, H, L, D]: one attention per frame, batched, no padding (frames share a length)
        q, k, v = (t.view(frames, n // frames, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        o = full_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = _act(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C] (merge-block order) → [N / merge², out_hidden]."""
        x = self.norm(x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def _axis_taps(n: int, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=True) taps of n target points on a `side`-long source axis."""
    src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
    lo = src.floor().long().clamp(0, side - 1)
    hi = (lo + 1).clamp(max=side - 1)
    frac = src - src.floor()
    return lo, hi, frac


class VisionModel(nn.Module):
    """Module names follow the checkpoint under `model.visual.`."""

    inv_freq: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.side = int(round(cfg.num_position_embeddings ** 0.5))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        d = cfg.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d),
                             persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def _block_order(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[h, w, ...] raster → [h·w, ...] in merge-block order (the processors' patch order)."""
        m = self.cfg.spatial_merge_size
        x = x.reshape(h // m, m, w // m, m, *x.shape[2:]).transpose(1, 2)
        return x.reshape(h * w, *x.shape[4:])

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The learned table resampled to an h×w patch grid, fp32, merge-block order: [h·w, C]."""
        table = self.pos_embed.weight.float().view(self.side, self.side, -1)
        lo, hi, f = _axis_taps(h, self.side)
        rows = table[lo] * (1 - f)[:, None, None] + table[hi] * f[:, None, None]  # [h, side, C]
        lo, hi, f = _axis_taps(w, self.side)
        grid = rows[:, lo] * (1 - f)[None, :, None] + rows[:, hi] * f[None, :, None]  # [h, w, C]
        return self._block_order(grid, h, w)

    def rotary(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary tables for one frame: cos, sin [h·w, head_dim] fp32 (h angles | w angles, twice)."""
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = self._block_order(torch.stack([ii, jj], -1), h, w).float().to(self.inv_freq.device)
        ang = (pos[:, :, None] * self.inv_freq).flatten(1)  # [hw, D/2]: h freqs then w freqs
        ang = torch.cat([ang, ang], -1)
        return ang.cos(), ang.sin()

    def encode_item(self, patches: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        """One image/video (or a run of its frames): patches [t·h·w, patch_dim] → [t·h·w/merge², out]."""
        x = self.patch_embed(patches.to(self.inv_freq.device))
        x = x + self.position_embedding(h, w).to(x.device).repeat(t, 1).to(x.dtype)
        cos, sin = self.rotary(h, w)
        cos, sin = cos.repeat(t, 1), sin.repeat(t, 1)
        for blk in self.blocks:
            x = blk(x, cos, sin, t)
        return self.merger(x)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list,
                max_patches: int | None = None) -> torch.Tensor:
        """pixel_values [Σ t·h·w, patch_dim], grid_thw [n, 3] → embeddings [Σ t·h·w / merge², out_hidden].

        Items are encoded one at a time; with `max_patches`, a video's frames are encoded in runs of at
        most that many patches (exact: attention is per frame), which bounds activation memory.
        """
        out, start = [], 0
        for t, h, w in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw):
            t, h, w = int(t), int(h), int(w)
            step = t if max_patches is None else max(1, min(t, max_patches // (h * w)))
            for t0 in range(0, t, step):
                tc = min(step, t - t0)
                out.append(self.encode_item(pixel_values[start + t0 * h * w: start + (t0 + tc) * h * w], tc, h, w))
            start += t * h * w
        if start != pixel_values.shape[0]:
            raise ValueError(f"grid_thw covers {start} patches but pixel_values has {pixel_values.shape[0]}")
        return torch.cat(out) if out else pixel_values.new_zeros(0, self.cfg.out_hidden_size, dtype=self.dtype)


def num_vision_tokens(grid_thw: torch.Tensor | list, merge_size: int = 2) -> list[int]:
    """Tokens each item yields in the prompt: t·h·w / merge²."""
    rows = grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw
    return [int(t) * int(h) * int(w) // merge_size ** 2 for t, h, w in rows]


def embed_multimodal(model: Qwen3_5ForCausalLM, input_ids: torch.Tensor, vision_embeds: torch.Tensor | None,
                     token_ids: tuple[int, ...]) -> torch.Tensor:
    """Token embeddings with vision placeholders replaced: input_ids [B, T] → inputs_embeds [B, T, H].

    `vision_embeds` [n, H] holds one row per placeholder token (any id in `token_ids`, e.g. the image
    and video pad ids), in prompt order (row-major over the batch).
    """
    embed = model.model.language_model.embed_tokens
    x = embed(input_ids)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for tid in token_ids:
        mask |= input_ids == tid
    n = int(mask.sum())
    got = 0 if vision_embeds is None else vision_embeds.shape[0]
    if n != got:
        raise ValueError(f"prompt has {n} vision placeholder tokens but {got} vision embeddings were given")
    if n:
        assert vision_embeds is not None  # n == got > 0
        x = x.masked_scatter(mask[..., None], vision_embeds.to(x.dtype))
    return x
