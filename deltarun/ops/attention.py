"""Causal grouped-query attention over a sequence's cached keys/values.

`attention(q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, D], scale) -> [B, Hq, T, D]` where the T
queries are the last T of the S positions (S - T earlier positions come from the cache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    t, s = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    # query i sits at absolute position s - t + i and may see keys 0..s - t + i
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
