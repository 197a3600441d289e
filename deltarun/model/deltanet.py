"""Gated DeltaNet token mixer (the `linear_attn` of Qwen3.5's linear-attention layers).

in_proj_qkv → causal depthwise conv1d + SiLU → split q, k, v → gated delta rule with
g = -exp(A_log)·softplus(a + dt_bias), beta = sigmoid(b) → gated RMSNorm with z → out_proj.
Attribute names are the checkpoint's (`model.language_model.layers.N.linear_attn.*`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.state import StatePool
from ..config import TextConfig
from ..ops.conv1d import causal_conv1d
from ..ops.gdn import chunk_gated_delta_rule, recurrent_gated_delta_rule
from .layers import RMSNormGated


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = cfg.linear_key_dim, cfg.linear_value_dim
        self.conv_dim, self.kernel = cfg.conv_dim, cfg.linear_conv_kernel_dim
        h = cfg.hidden_size
        self.in_proj_qkv = nn.Linear(h, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(h, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(h, self.hv, bias=False)
        self.in_proj_a = nn.Linear(h, self.hv, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                bias=False, padding=self.kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = RMSNormGated(self.dv, eps=cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, h, bias=False)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sequence (conv state, recurrent state) shapes."""
        return (self.conv_dim, self.kernel - 1), (self.hv, self.dk, self.dv)

    def forward(self, x: torch.Tensor, pool: StatePool, index: int, slots: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] → [B, T, hidden]; reads and advances the states of `slots` [B] in the pool
        (`index` = which linear-attention layer this is)."""
        b, t, _ = x.shape
        qkv, conv = causal_conv1d(self.in_proj_qkv(x), self.conv1d.weight.squeeze(1), pool.conv[index][slots])
        pool.conv[index].index_copy_(0, slots, conv)
        q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(b, t, self.hk, self.dk)
        k = k.reshape(b, t, self.hk, self.dk)
        v = v.reshape(b, t, self.hv, self.dv)
        beta = self.in_proj_b(x).sigmoid()
        # fp32 before exp/softplus: in fp16 exp(A_log) could overflow
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias.float())
        rule = recurrent_gated_delta_rule if t == 1 else chunk_gated_delta_rule
        o, state = rule(q, k, v, g, beta, pool.recurrent[index][slots])
        pool.recurrent[index].index_copy_(0, slots, state)
        z = self.in_proj_z(x).reshape(b, t, self.hv, self.dv)
        o = self.norm(o, z).reshape(b, t, self.value_dim)
        return self.out_proj(o)
