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
from ..ops import gemv, kernels
from ..ops.conv1d import causal_conv1d
from ..ops.gdn import chunk_gated_delta_rule, decode_step
from ..ops.linear import Linear
from .layers import RMSNormGated


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = cfg.linear_key_dim, cfg.linear_value_dim
        self.conv_dim, self.kernel = cfg.conv_dim, cfg.linear_conv_kernel_dim
        h = cfg.hidden_size
        self.in_proj_qkv = Linear(h, self.conv_dim, bias=False)
        self.in_proj_z = Linear(h, self.value_dim, bias=False)
        self.in_proj_b = Linear(h, self.hv, bias=False)
        self.in_proj_a = Linear(h, self.hv, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                bias=False, padding=self.kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = RMSNormGated(self.dv, eps=cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, h, bias=False)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sequence (conv state, recurrent state) shapes."""
        return (self.conv_dim, self.kernel - 1), (self.hv, self.dk, self.dv)

    def forward(self, x: torch.Tensor, pool: StatePool, index: int, slots: torch.Tensor | slice,
                capture: dict | None = None, spans: list[slice] | None = None) -> torch.Tensor:
        """x [B, T, hidden] → [B, T, hidden]; reads and advances the states of `slots` [B] in the pool
        (`index` = which linear-attention layer this is). `capture` (a speculative verify): record the
        state after every position in it (ModelCache.capture). Packed (B = 1): the row's `spans` of
        positions advance the states of `slots` in turn."""
        b, t, _ = x.shape
        if capture is not None:
            return self._verify_steps(x, pool, index, slots, capture)
        if t == 1:
            return self._decode_step(x, pool, index, slots)
        mixed, w = self.in_proj_qkv(x), self.conv1d.weight.squeeze(1)
        beta, g = self._gates(x)
        if spans is None:
            segments = [(slice(None), slots)]
        else:  # one (span, slot) per sequence: each runs its conv and delta rule from its own state
            ids = range(slots.start, slots.stop) if isinstance(slots, slice) else slots.tolist()
            segments = [(span, slice(i, i + 1)) for span, i in zip(spans, ids)]
        outs = []
        for seg, sl in segments:
            qkv, conv = causal_conv1d(mixed[:, seg], w, pool.conv[index][sl])
            pool.conv[index][sl] = conv
            n = qkv.shape[1]
            q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
            q = q.reshape(b, n, self.hk, self.dk)
            k = k.reshape(b, n, self.hk, self.dk)
            v = v.reshape(b, n, self.hv, self.dv)
            o, state = chunk_gated_delta_rule(q, k, v, g[:, seg], beta[:, seg], pool.recurrent[index][sl])
            pool.recurrent[index][sl] = state
            outs.append(o)
        o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        z = self.in_proj_z(x).reshape(b, t, self.hv, self.dv)
        o = self.norm(o, z).reshape(b, t, self.value_dim)
        return self.out_proj(o)

    def _projections_ab(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] → in_proj_a(x), in_proj_b(x) [B, T, Hv] in fp32. These projections are tiny (Hv
        rows) and run in fp32 — faster than bf16 GEMV at this size and free of overflow in exp."""
        rows = x.numel() // x.shape[-1]
        small = x.device.type == "cpu" and rows <= 16 and kernels.available()  # decode: a plain C++ loop

        def proj(mod: nn.Module) -> torch.Tensor:  # a GGUF file may hold them quantized: then its module runs
            if not isinstance(mod, nn.Linear):
                return mod(x).float()
            if small and mod.weight.dtype == torch.float32:
                y = gemv.gemv_f32(x.reshape(rows, -1), mod.weight).view(*x.shape[:-1], -1)
            else:
                y = F.linear(x.float(), mod.weight.float())
            delta = getattr(mod, "delta", None)  # a LoRA adapter's (ops/lora.py): this path bypasses forward
            d = None if delta is None else delta(x.float())
            return y if d is None else y + d
        return proj(self.in_proj_a), proj(self.in_proj_b)

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] → (beta, g) [B, T, Hv] fp32: write strength sigmoid(b) and log-decay
        −exp(A_log)·softplus(a + dt_bias)."""
        a, b = self._projections_ab(x)
        return b.sigmoid(), -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())

    def _decode_step(self, x: torch.Tensor, pool: StatePool, index: int, slots: torch.Tensor | slice) -> torch.Tensor:
        """forward for one token per sequence (x [B, 1, hidden]): the projections here, everything between
        them in one step on the pooled states (ops/gdn.py `decode_step`: a fused op on the CPU)."""
        b = x.shape[0]
        a, bp = self._projections_ab(x)
        o = decode_step(self.in_proj_qkv(x).view(b, -1), pool.conv[index], self.conv1d.weight.view(self.conv_dim, -1),
                        a.view(b, -1), bp.view(b, -1), self.A_log, self.dt_bias, pool.recurrent[index], slots,
                        self.hk, self.in_proj_z(x).view(b, -1), self.norm.weight, self.norm.eps)
        return self.out_proj(o.view(b, 1, self.value_dim))

    def _verify_steps(self, x: torch.Tensor, pool: StatePool, index: int, slots: torch.Tensor | slice,
                      capture: dict) -> torch.Tensor:
        """forward over a few positions (x [B, T, hidden]), each computed by the very step `_decode_step`
        takes for one token (so a verified token is bit for bit a plain decode's), recording in
        `capture[index]` the conv input window [B, C, K-1+T] (the conv state after position i is
        window[..., i+1 : i+K]) and the recurrent state after positions 0 … T−2 ([T−1, B, Hv, Dk, Dv] fp32,
        the pool's scratch; after the last position it is the pool's own state): speculative decoding
        resumes from whichever position it accepts."""
        t = x.shape[1]
        mixed, z = self.in_proj_qkv(x), self.in_proj_z(x)
        ab = [self._projections_ab(x[:, i : i + 1]) for i in range(t)]  # as plain decode computes them
        conv, rec = pool.conv[index], pool.recurrent[index]
        window = torch.cat([conv[slots], mixed.transpose(1, 2).to(conv.dtype)], dim=-1)
        w = self.conv1d.weight.view(self.conv_dim, -1)
        snaps = pool.verify_buffer(index, t - 1, x.shape[0])
        outs = [decode_step(mixed[:, i], conv, w, ab[i][0][:, 0], ab[i][1][:, 0], self.A_log, self.dt_bias, rec, slots,
                            self.hk, z[:, i], self.norm.weight, self.norm.eps, snap=snaps[i] if i < t - 1 else None)
                for i in range(t)]
        capture[index] = (window, snaps)
        return self.out_proj(torch.stack(outs, 1))
