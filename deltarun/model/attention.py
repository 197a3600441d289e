"""Gated full attention (the `self_attn` of Qwen3.5's full-attention layers).

q_proj yields, per head, [query (head_dim) | gate (head_dim)]; q and k get a per-head RMSNorm and
partial rotary; GQA over the KV cache; the output is multiplied by sigmoid(gate) before o_proj.
"""
from __future__ import annotations

import torch
from torch import nn

from ..cache.state import KVCache
from ..config import TextConfig
from ..ops.attention import attention
from ..ops.linear import Linear
from .layers import RMSNorm, apply_rotary


class GatedAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.nq, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.gated = cfg.attn_output_gate
        self.q_proj = Linear(h, self.nq * self.d * (2 if self.gated else 1), bias=bias)
        self.k_proj = Linear(h, self.nkv * self.d, bias=bias)
        self.v_proj = Linear(h, self.nkv * self.d, bias=bias)
        self.o_proj = Linear(self.nq * self.d, h, bias=bias)
        self.q_norm = RMSNorm(self.d, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, eps=cfg.rms_norm_eps)
        self.scale = self.d**-0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], caches: list[KVCache],
                spans: list[slice] | None = None) -> torch.Tensor:
        """x [B, T, hidden], rope cos/sin [B, T, rotary_dim] → [B, T, hidden]; row b appends its keys
        and values to caches[b] and attends over that sequence's own history. Packed (B = 1): the
        row's `spans` of positions are the sequences of `caches`, in turn."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nq, -1)
        if self.gated:
            q, gate = q.split(self.d, dim=-1)
            gate = gate.reshape(b, t, self.nq * self.d)
        q = apply_rotary(self.q_norm(q), *rope)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(b, t, self.nkv, self.d)), *rope)
        v = self.v_proj(x).view(b, t, self.nkv, self.d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if spans is not None:  # packed: segments of the one row, [1, H, T_i, D] each
            parts = [(slice(0, 1), s) for s in spans]
        else:
            parts = [(slice(i, i + 1), slice(None)) for i in range(b)]
        rows = []
        for (r, s), cache in zip(parts, caches):  # sequences differ in length: attention runs per sequence
            k_all, v_all = cache.append(k[r, :, s], v[r, :, s])
            rows.append(attention(q[r, :, s], k_all, v_all, self.scale))
        o = torch.cat(rows, dim=0 if spans is None else 2) if len(rows) > 1 else rows[0]
        o = o.transpose(1, 2).reshape(b, t, self.nq * self.d)
        if self.gated:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o)
