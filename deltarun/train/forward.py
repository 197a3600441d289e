"""The training forward of a Qwen3.5 decoder: packed examples → summed next-token loss, differentiable in the LoRA
weights (train/lora.py).

It reads the weights of deltarun's own model (model/qwen3_5.py) and runs the same math in plain torch ops, so
autograd goes through it: no caches, no C++ kernels, no in-place state. The engine's forward is not reused:
it advances per-sequence caches in place and routes through kernels that have no backward.

Packing: one row holds several examples end to end, and nothing crosses from one to the next —
- rotary positions restart at 0 for each example;
- attention runs per example (causal within it);
- the DeltaNet conv reads zeros before an example's first token (ops/gdn_autograd.py `causal_conv1d_packed`);
- the delta rule's state restarts at each example: examples are laid out on chunk boundaries (zero-padded
  between them, which writes nothing: k = β = 0, g = 0) and the state is zeroed at each one's first chunk.
So a packed row's loss is the sum of its examples' losses alone (tests/test_finetune.py).

Precision (`compute`): base weights stay in the dtype they were loaded in (bf16 in training) and are cast per
use; fp32 compute widens them (CPUs without hardware bf16 matmul, where bf16 GEMMs are emulated and slow),
bf16 compute multiplies in bf16 (AVX512-BF16 / AMX CPUs, GPUs). LoRA deltas, the DeltaNet recurrence, norms and
the loss are fp32 either way. The loss head runs on the loss positions only, in checkpointed slices, so the
[tokens, vocab] logits never exist whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.layers import apply_rotary
from ..ops.gdn import rms_norm_gated
from ..ops.gdn_autograd import causal_conv1d_packed, chunk_gated_delta_rule_autograd
from ..ops.linear import WIDEN_ROWS, _widened
from .lora import TrainableLoRA

CHUNK = 64  # the delta rule's chunk: examples start on multiples of it in the DeltaNet layout
HEAD_SLICE = 256  # loss positions per checkpointed lm_head + cross-entropy slice


class _FrozenLinear(torch.autograd.Function):
    """x · wᵀ for a frozen weight w stored in another dtype than x (bf16 weights, fp32 compute): w is widened
    a block of rows at a time into a reused buffer (ops/linear.py `_widened`) in the forward and again in the
    backward, so no fp32 copy of a weight is allocated per call or kept for the backward (a fresh 1 GB copy of
    the 0.8B lm_head per call made fp32 training 7× slower)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.cat([x2 @ _widened(w[i:i + WIDEN_ROWS]).t() for i in range(0, w.shape[0], WIDEN_ROWS)], 1)
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        (w,) = ctx.saved_tensors
        gy = grads[0].reshape(-1, w.shape[0])
        gx = None
        for i in range(0, w.shape[0], WIDEN_ROWS):
            part = gy[:, i:i + WIDEN_ROWS] @ _widened(w[i:i + WIDEN_ROWS])
            gx = part if gx is None else gx.add_(part)
        assert gx is not None
        return gx.view(*grads[0].shape[:-1], w.shape[1]), None


def frozen_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) in x's dtype for a weight that takes no gradient."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    if x.dtype != torch.float32 or w.device.type != "cpu":
        return F.linear(x, w.to(x.dtype))
    return _FrozenLinear.apply(x, w)


@dataclass
class Row:
    """One packed sequence: ids [T], labels [T] (the next token to predict at each position, -100 where there
    is no loss; never across examples), and the examples' lengths (summing to T)."""
    ids: torch.Tensor
    labels: torch.Tensor
    lengths: list[int]

    @property
    def loss_tokens(self) -> int:
        return int((self.labels != -100).sum())


@dataclass
class Layout:
    """Where each example sits: per-token positions, first-token flags, and the chunk-aligned DeltaNet layout."""
    positions: torch.Tensor  # [T] position within its example
    starts: torch.Tensor  # [T] bool: an example's first token
    padded_index: torch.Tensor  # [T] where each token sits in the chunk-aligned layout
    padded_len: int
    resets: list[bool]  # per chunk of the padded layout: a new example starts there
    bounds: list[tuple[int, int]]  # each example's [start, end)

    @classmethod
    def of(cls, lengths: list[int], device: torch.device) -> Layout:
        positions, index, resets, bounds = [], [], [], []
        at = pad_at = 0
        for n in lengths:
            positions.append(torch.arange(n))
            index.append(torch.arange(n) + pad_at)
            chunks = -(-n // CHUNK)
            resets += [True] + [False] * (chunks - 1)
            bounds.append((at, at + n))
            at, pad_at = at + n, pad_at + chunks * CHUNK
        starts = torch.zeros(at, dtype=torch.bool)
        starts[[b[0] for b in bounds]] = True
        return cls(torch.cat(positions).to(device), starts.to(device), torch.cat(index).to(device), pad_at, resets,
                   bounds)


class TrainForward:
    """Loss of packed rows for `model` (a deltarun Qwen3_5ForCausalLM, frozen) with the trainable `lora`."""

    def __init__(self, model: nn.Module, lora: TrainableLoRA, compute: torch.dtype = torch.float32,
                 checkpointing: bool = True):
        self.model, self.lora, self.dtype, self.checkpointing = model, lora, compute, checkpointing
        self.lm = getattr(model, "model").language_model

    # ------------------------------------------------------------------ pieces
    def _lin(self, mod: Any, x: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """mod(x) in the compute dtype (fp32 for `fp32`), plus its LoRA delta."""
        dtype = torch.float32 if fp32 else self.dtype
        y = frozen_linear(x.to(dtype), getattr(mod, "weight"))
        if mod.bias is not None:
            y = y + mod.bias.to(dtype)
        d = self.lora.delta(mod, x)
        return y if d is None else y + d.to(dtype)  # bf16 compute: the fp32 delta rounded once, as PEFT adds it

    def _norm(self, norm: Any, x: torch.Tensor) -> torch.Tensor:
        """Zero-centred RMSNorm (model/layers.py `RMSNorm`) in fp32, rounded to x's dtype."""
        w = getattr(norm, "weight")
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + w.float(), norm.eps).to(x.dtype)

    # the modules below are model/ layers read by attribute (q_proj, A_log, …): typed Any, as nn.Module's
    # __getattr__ types every attribute as Tensor | Module
    def _attention(self, at: Any, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   lay: Layout) -> torch.Tensor:
        """Gated attention (model/attention.py) over x [1, T, H], causal within each example."""
        t, d = x.shape[1], at.d
        q = self._lin(at.q_proj, x).view(1, t, at.nq, -1)
        gate = None
        if at.gated:
            q, gate = q.split(d, dim=-1)
            gate = gate.reshape(1, t, at.nq * d)
        q = apply_rotary(self._norm(at.q_norm, q), *rope).transpose(1, 2)
        k = apply_rotary(self._norm(at.k_norm, self._lin(at.k_proj, x).view(1, t, at.nkv, d)), *rope).transpose(1, 2)
        v = self._lin(at.v_proj, x).view(1, t, at.nkv, d).transpose(1, 2)
        gqa: dict[str, Any] = {"enable_gqa": True} if at.nq != at.nkv else {}
        o = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                      scale=at.scale, **gqa) for a, b in lay.bounds], dim=2)
        o = o.transpose(1, 2).reshape(1, t, at.nq * d)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self._lin(at.o_proj, o)

    def _deltanet(self, la: Any, x: torch.Tensor, lay: Layout) -> torch.Tensor:
        """Gated DeltaNet (model/deltanet.py) over x [1, T, H], each example from a zero state."""
        t = x.shape[1]
        mixed = self._lin(la.in_proj_qkv, x)
        qkv = causal_conv1d_packed(mixed, la.conv1d.weight.view(la.conv_dim, -1),
                                   lay.starts if len(lay.bounds) > 1 else None)
        a, b = self._lin(la.in_proj_a, x, fp32=True), self._lin(la.in_proj_b, x, fp32=True)
        beta = b.sigmoid()
        g = -la.A_log.float().exp() * F.softplus(a + la.dt_bias.float())
        parts = [qkv[..., :la.key_dim], qkv[..., la.key_dim:2 * la.key_dim], qkv[..., 2 * la.key_dim:], g, beta]
        if len(lay.bounds) > 1 or t % CHUNK:  # the chunk-aligned layout (a lone example needs none)
            parts = [p.new_zeros(1, lay.padded_len, p.shape[-1]).index_copy(1, lay.padded_index, p) for p in parts]
        tp = parts[0].shape[1]
        q, k, v = (parts[0].view(1, tp, la.hk, la.dk), parts[1].view(1, tp, la.hk, la.dk),
                   parts[2].view(1, tp, la.hv, la.dv))
        o = chunk_gated_delta_rule_autograd(q, k, v, parts[3], parts[4], lay.resets, CHUNK)
        if tp != t or len(lay.bounds) > 1:
            o = o.index_select(1, lay.padded_index)
        z = self._lin(la.in_proj_z, x).view(1, t, la.hv, la.dv)
        o = rms_norm_gated(o, z, la.norm.weight.to(o.dtype), la.norm.eps).reshape(1, t, la.value_dim)
        return self._lin(la.out_proj, o)

    def _layer(self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               lay: Layout) -> torch.Tensor:
        h = self._norm(layer.input_layernorm, x)
        if layer.layer_type == "linear_attention":
            h = self._deltanet(layer.linear_attn, h, lay)
        else:
            h = self._attention(layer.self_attn, h, (cos, sin), lay)
        x = x + h
        h = self._norm(layer.post_attention_layernorm, x)
        mlp = layer.mlp
        return x + self._lin(mlp.down_proj, F.silu(self._lin(mlp.gate_proj, h)) * self._lin(mlp.up_proj, h))

    def _head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of hidden rows h [N, H] against labels [N], in fp32."""
        logits = frozen_linear(h.to(self.dtype), getattr(self.model, "lm_head").weight).float()
        return F.cross_entropy(logits, labels, reduction="sum")

    # ------------------------------------------------------------------ whole row
    def hidden(self, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Final-normed hidden states [T, H] of the packed row `ids` [T]."""
        lay = Layout.of(lengths, ids.device)
        x = self.lm.embed_tokens.weight[ids].to(self.dtype).unsqueeze(0)
        cos, sin = self.lm.rotary_emb(lay.positions.view(1, 1, -1).expand(3, 1, -1), self.dtype)
        for layer in self.lm.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, layer, x, cos, sin, lay, use_reentrant=False)
            else:
                x = self._layer(layer, x, cos, sin, lay)
        return self._norm(self.lm.norm, x)[0]

    def loss_sum(self, row: Row) -> torch.Tensor:
        """The row's next-token cross-entropy summed over its loss positions (fp32 scalar)."""
        keep = (row.labels != -100).nonzero().squeeze(1)
        h = self.hidden(row.ids, row.lengths).index_select(0, keep)
        labels = row.labels.index_select(0, keep)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, len(keep), HEAD_SLICE):
            hs, ls = h[i:i + HEAD_SLICE], labels[i:i + HEAD_SLICE]
            if torch.is_grad_enabled():
                total = total + checkpoint(self._head_loss, hs, ls, use_reentrant=False)
            else:
                total = total + self._head_loss(hs, ls)
        return total
