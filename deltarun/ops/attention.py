"""Causal grouped-query attention over a sequence's cached keys/values.

`attention(q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, D], scale) -> [B, Hq, T, D]` where the T
queries are the last T of the S positions (S - T earlier positions come from the cache); `full_attention`, the
same without the causal mask (the vision tower).

Which path runs: one query (decode) → SDPA with the query group folded in; bf16 chunks of ≥ KERNEL_ROWS
queries (fewer near the start) on a CPU with AVX512-BF16 → our kernel (csrc/attn.cpp: bf16 dot products in
hardware, where torch's flash attention widens to fp32 SGEMM; 2,048 × 2,048 causal 137 → 46 ms, 2,048 queries at
depth 32K 2.94 → 1.36 s); otherwise torch's flash attention (whole prompt: causal SDPA; deeper chunks:
`_prefix_and_diagonal`, or masked SDPA where torch lacks it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import kernels

# The kernel packs every key per call (~0.5 ms per 1,000 keys of the 0.8B shape): from 16 queries it wins at any
# depth (16 over 40K keys: 39 → 30 ms), from 8 up to 16K keys (8 over 4,000: 2.0 → 1.1 ms; over 40K: 20 → 24 ms)
KERNEL_ROWS, KERNEL_ROWS_SHALLOW, SHALLOW_KEYS = 16, 8, 16384
MASK_ENTRIES = 1 << 24  # above this many query × key pairs a masked chunk is split by queries
QUERY_BLOCK = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    groups = hq // hkv
    if t == 1:
        # One query per head sees every key: fold each KV head's query group into the query axis,
        # so keys are read once per KV head (≈10× faster than enable_gqa on CPU at long context).
        o = F.scaled_dot_product_attention(q.view(b, hkv, groups, d), k, v, scale=scale)
        return o.view(b, hq, 1, d)
    if (t >= KERNEL_ROWS or (t >= KERNEL_ROWS_SHALLOW and s <= SHALLOW_KEYS)) and _kernel_takes(q, k, v):
        return torch.ops.deltarun.attn_bf16(q, k, v, scale, True)
    gqa: dict[str, Any] = {"enable_gqa": True} if groups > 1 else {}  # never materialises repeated K/V
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    if _flash_lse(q):
        return _prefix_and_diagonal(q, k, v, scale)
    if t * s <= MASK_ENTRIES:
        return _masked(q, k, v, scale, gqa)
    # A long prompt's chunk deep into it: by blocks of queries, each over only the keys it can see, so
    # the mask and SDPA's buffers stay small (at 262K tokens a 2,048-query mask alone is 0.5 GB).
    outs = []
    for a in range(0, t, QUERY_BLOCK):
        e = min(t, a + QUERY_BLOCK)
        end = s - t + e  # the block's last query sits at end - 1
        outs.append(_masked(q[:, :, a:e], k[:, :, :end], v[:, :, :end], scale, gqa))
    return torch.cat(outs, dim=2)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention, every query over every key (the vision tower's frames): q, k, v [B, H, L, D] →
    [B, H, L, D], scale D^-0.5. bf16 frames of ≥ KERNEL_ROWS patches run on the kernel where `attention`'s would."""
    if q.shape[2] >= KERNEL_ROWS and k.shape[1] == q.shape[1] and _kernel_takes(q, k, v):
        return torch.ops.deltarun.attn_bf16(q, k, v, q.shape[-1] ** -0.5, False)
    return F.scaled_dot_product_attention(q, k, v)


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether csrc/attn.cpp runs these: bf16 on a CPU with AVX512-BF16 (kernels built and self-checked), head size
    a multiple of 16, rows contiguous, and no autograd (the kernel has no backward)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape[-1] % 16 == 0
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and kernels.has_attn())


def _masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, gqa: dict) -> torch.Tensor:
    """The T queries are the last T of the S key positions: query i may see keys 0..S - T + i."""
    t, s = q.shape[2], k.shape[2]
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


def _flash_lse(q: torch.Tensor) -> bool:
    """Whether torch's CPU flash attention, which also returns each query's log-sum-exp, takes these queries."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _prefix_and_diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """`_masked` in two unmasked parts merged by their log-sum-exp: the S - T keys every query sees (with each KV
    head's query group folded into the query axis, so its keys are read once), and the causal T × T diagonal. A
    256-query block at depth 32K (bf16, 8 query / 2 KV heads, 2-core Zen 4): 496–514 ms masked with enable_gqa,
    377–400 ms here; no [T, S] mask at any depth. Short chunks gain too: a 3-row speculative verify over 4,000 cached
    keys 2.4 → 0.96 ms; an 80-token chunk over 200 keys is level (0.96 → 1.1 ms)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g, p = hq // hkv, s - t
    o1, lse1 = flash(q.reshape(b, hkv, g * t, d), k[:, :, :p], v[:, :, :p], scale=scale)[:2]
    kd, vd = k[:, :, p:], v[:, :, p:]
    if g > 1:  # T keys: repeating them per query head is cheap
        kd, vd = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
    o2, lse2 = flash(q, kd, vd, is_causal=True, scale=scale)[:2]
    lse1 = lse1.reshape(b, hq, t)
    top = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - top).exp_().unsqueeze(-1), (lse2 - top).exp_().unsqueeze(-1)
    o = o1.reshape(b, hq, t, d).float() * w1 + o2.float() * w2
    return o.div_(w1 + w2).to(q.dtype)
