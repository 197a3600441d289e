"""Small building blocks shared by the decoder: norms, the SwiGLU MLP and the rotary tables.

Qwen3.5 quirks live here: the decoder RMSNorm stores its weight zero-centred (`1 + w`), the DeltaNet
output norm is a plain-weight RMSNorm gated by `silu(z)`, and rotary embeddings are partial
(first `rotary_dim` of each head) with the interleaved M-RoPE layout over (temporal, height, width).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeConfig
from ..ops.gdn import rms_norm_gated
from ..ops.gemv import add_rms_norm_zc, fused_norm, rms_norm_zc
from ..ops.linear import Linear


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding [num, dim]. Built on the meta device (every loader does) it skips nn.Embedding's normal_
    init: the first normal_ on meta costs ~1 s of lazy imports, and a loaded checkpoint overwrites it anyway."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: `x * rsqrt(mean(x²) + eps) * (1 + weight)`, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_norm(x):  # decode on the CPU: one C++ op (ops/csrc/norm.cpp), the same math
            return rms_norm_zc(x, self.weight, self.eps)
        # torch's fused kernel: the same fp32 math as the reference (x·rsqrt(mean(x²)+eps)·(1+w)) in one op
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).to(x.dtype)


def residual_norm(x: torch.Tensor, h: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) with s = x + h: the residual add and the next norm, one op for decode on the CPU."""
    if fused_norm(x):
        return add_rms_norm_zc(x, h, norm.weight, norm.eps)
    s = x + h
    return s, norm(s)


class RMSNormGated(nn.Module):
    """`weight * rmsnorm(x) * silu(z)` over the last dim (DeltaNet output norm, weight init ones)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return rms_norm_gated(x, z, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(rope: RopeConfig, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim // 2] and the cos/sin scale (YaRN's attention factor, else 1)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim
    pos_freqs = rope.theta**exponents
    if rope.rope_type != "yarn" or rope.factor <= 1.0:
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    original = rope.original_max_position_embeddings or 262_144
    scale = rope.attention_factor
    if scale is None:
        scale = 0.1 * math.log(factor) + 1.0

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(rope.beta_slow)), rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 → keep the original frequency, 0 → divide it by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(scale)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for partial interleaved M-RoPE.

    `forward(positions [3, B, T]) -> (cos, sin)` each [B, T, rotary_dim]. Frequency slot f takes its
    position from axis T, H or W in the repeating pattern T,H,W,T,H,W,… (H and W only within their
    `mrope_section` budgets); for text all three axes carry the same index.
    """

    def __init__(self, rope: RopeConfig, rotary_dim: int):
        super().__init__()
        # Kept off the module's buffers so that casting the model to bf16 never rounds the frequencies.
        self._inv_freq, self.scale = rope_inv_freq(rope, rotary_dim)
        half = rotary_dim // 2
        axis = torch.zeros(half, dtype=torch.long, device="cpu")  # real even under a meta-device init
        if rope.mrope_interleaved:
            for a in (1, 2):
                axis[a : 3 * rope.mrope_section[a] : 3] = a
        else:  # contiguous sections: [T…][H…][W…]
            bounds = torch.tensor(rope.mrope_section, device="cpu").cumsum(0)
            axis = torch.bucketize(torch.arange(half, device="cpu"), bounds, right=True).clamp(max=2)
        self._axis = axis

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
            self._axis = self._axis.to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # [3, B, T, half]
        idx = self._axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, idx)[0]  # [B, T, half]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of x [B, T, H, D] (rotate-half layout); cos/sin [B, T, rd]."""
    rd = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
