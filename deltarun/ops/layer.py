"""Decoder layers' decode steps as single C++ ops (csrc/layer.cpp) on the CPU.

A 0.8B decode step makes ~700 Python-level calls (modules, views, small ops, kernels); at ~10–15 µs each
they cost as much as the int4 matmuls themselves. Where every linear of a layer runs on one of our
kernels, the layer's decode step is one op that calls those same kernels in the same order, so its
output is bit for bit the modules' (tests/test_fused_layer.py). The tensors each kernel reads are
gathered once per layer here (`plan`); anything else (prefill, more than gemv.max_rows() sequences, a
speculative verify, weights without a kernel, CUDA) runs the modules as before. A forward whose rows run
LoRA adapters (ops/lora.py) takes the same ops, each adapter-carrying linear's tensors followed by its
slots' [A, Bt, mask] (`with_adapters`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn

from . import gemv, kernels
from .linear import Linear
from .lora import SlotDelta
from .quant import QuantLinear
from .settings import settings

_NO = object()  # cached "this layer has no fused plan"


@dataclass
class Norm:
    weight: torch.Tensor
    eps: float


@dataclass
class TailParts:
    """The residual add, post-attention norm and SwiGLU MLP every decoder layer ends with."""

    post_norm: Norm
    gate: nn.Module
    up: nn.Module
    down: nn.Module


@dataclass
class GDNParts:
    """A Gated DeltaNet layer's decode step, as csrc/layer.cpp `gdn_layer_decode` takes it."""

    in_norm: Norm
    qkv: nn.Module
    z: nn.Module
    a: nn.Module
    b: nn.Module
    out: nn.Module
    conv_weight: torch.Tensor  # [C, K]
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    norm: Norm  # the gated output norm
    hk: int  # key heads


@dataclass
class AttnParts:
    """A gated full-attention layer's decode step, as csrc/layer.cpp `attn_layer_decode` takes it."""

    in_norm: Norm
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    q_norm: Norm
    k_norm: Norm
    nq: int
    nkv: int
    head_dim: int
    scale: float
    gated: bool


@dataclass
class LayerParts:
    """What a decoder layer hands the fused path (model/qwen3_5.py `DecoderLayer.fused_parts`)."""

    tail: TailParts
    gdn: GDNParts | None = None
    attn: AttnParts | None = None


def linear_args(mod: nn.Module) -> list[torch.Tensor] | None:
    """The tensors of the kernel `mod` runs on a few bf16 rows (csrc/layer.cpp's encoding), or None when
    it would run something else (its route is not one of our kernels). An adapter's delta does not count: it
    joins per forward (`with_adapters`)."""
    if isinstance(mod, Linear):
        w = mod.weight
        if mod.bias is not None or not w.is_contiguous():
            return None
        if mod.routes is not None and mod.routes["decode"] == "gemv_bf16":
            return [w]
        return [w] if w.dtype == torch.float32 else None  # DeltaNet's fp32 in_proj_a / in_proj_b: gemv_f32
    if isinstance(mod, QuantLinear) and mod.dtype == torch.bfloat16:
        return mod.decode_tensors()
    return None


@dataclass
class Plan:
    tail: tuple  # (post_norm, eps, gate, up, down)
    gdn: tuple | None = None  # a linear-attention layer's arguments before the pools
    hk: int = 0
    attn: tuple | None = None  # a full-attention layer's arguments before the rotary tables
    attn_rest: tuple = ()  # … and between the caches' lengths and the tail
    kv_shape: tuple = ()  # [1, Hkv, 1, D]: what a KV cache grows by
    linears: tuple = ()  # (field, position, module): where each linear's tensors sit, for `with_adapters`


class Fusable(Protocol):
    """A decoder layer the fused path can take (model/qwen3_5.py `DecoderLayer`)."""

    def fused_parts(self) -> LayerParts: ...


def plan(layer: Fusable) -> Plan | None:
    """The layer's fused-decode arguments, built on first use from `layer.fused_parts()` and cached on the
    layer (None: no plan)."""
    p = layer.__dict__.get("_decode_plan")
    if p is None:
        p = _build(layer.fused_parts()) or _NO
        layer.__dict__["_decode_plan"] = p
    return p if isinstance(p, Plan) else None  # else the cached _NO


def reset(model: nn.Module) -> None:
    """Forget the cached plans (after `DELTARUN_FUSED_LAYERS` or the kernels' availability changed)."""
    for m in model.modules():
        m.__dict__.pop("_decode_plan", None)


def _build(parts: LayerParts) -> Plan | None:
    if not settings().fused_layers or not kernels.available():
        return None
    t = parts.tail
    lins = [linear_args(m) for m in (t.gate, t.up, t.down)]
    if any(a is None for a in lins) or t.post_norm.weight.device.type != "cpu":
        return None
    p = Plan(tail=(t.post_norm.weight, t.post_norm.eps, *lins))
    at_ = lambda field, first, mods: tuple((field, first + i, m) for i, m in enumerate(mods))  # noqa: E731
    p.linears = at_("tail", 2, (t.gate, t.up, t.down))
    if (g := parts.gdn) is not None:
        proj = [linear_args(m) for m in (g.qkv, g.z, g.a, g.b)]
        out = linear_args(g.out)
        if any(a is None for a in proj) or out is None or g.norm.weight.dtype != torch.bfloat16:
            return p
        p.gdn = (g.in_norm.weight, g.in_norm.eps, *proj, g.conv_weight.contiguous(), g.A_log.float().contiguous(),
                 g.dt_bias.float().contiguous(), g.norm.weight, g.norm.eps, out)
        p.hk = g.hk
        p.linears += at_("gdn", 2, (g.qkv, g.z, g.a, g.b)) + at_("gdn", 11, (g.out,))
    elif (at := parts.attn) is not None:
        proj = [linear_args(m) for m in (at.q, at.k, at.v, at.o)]
        if any(a is None for a in proj) or not at.gated:
            return p
        p.attn = (at.in_norm.weight, at.in_norm.eps, *proj[:3], at.q_norm.weight, at.q_norm.eps, at.k_norm.weight,
                  at.k_norm.eps)
        p.attn_rest = (at.nq, at.nkv, at.scale, proj[3])
        p.kv_shape = (1, at.nkv, 1, at.head_dim)
        p.linears += at_("attn", 2, (at.q, at.k, at.v)) + at_("attn_rest", 3, (at.o,))
    return p


def with_adapters(p: Plan, x: torch.Tensor) -> Plan | None:
    """`p` for this forward's rows (x [B, 1, H]) when some run LoRA adapters: each linear carrying a `SlotDelta`
    gets its [A, Bt, mask] appended, as csrc/layer.cpp `lin` takes them (None: a delta the ops cannot take, so
    the modules run)."""
    fields: dict[str, list] = {}
    for field, pos, mod in p.linears:
        h = getattr(mod, "delta", None)
        if h is None:
            continue
        if not isinstance(h, SlotDelta):
            return None
        if not h.kernel_path(x.shape[0]):
            return None
        mask = h.slots.mask(x, torch.float32)  # the mask the modules' hooks build: cached per forward
        if mask is None:
            continue
        args = fields.setdefault(field, list(getattr(p, field)))
        n = mask.shape[1]  # slots up to the highest in use, as the hook slices them
        args[pos] = [*args[pos], h.A[:n], h.Bt[:n], mask]
    if not fields:
        return p
    q = replace(p)
    for f, a in fields.items():
        setattr(q, f, tuple(a))
    return q


def usable(x: torch.Tensor) -> bool:
    """Whether x [B, T, H] is a decode step the fused ops take: one bf16 token per row, few rows, no grad."""
    return (x.shape[1] == 1 and x.shape[0] <= gemv.max_rows() and x.dtype == torch.bfloat16
            and x.device.type == "cpu" and not torch.is_grad_enabled())


def gdn_layer(p: Plan, x: torch.Tensor, cache, index: int, slots: torch.Tensor | slice) -> torch.Tensor:
    """A linear-attention layer's whole decode step (x [B, 1, H] → [B, 1, H]); advances the pooled states of
    `cache` (a ModelCache) at `slots`."""
    if isinstance(slots, slice):  # the op takes slot indices: made once per forward, not once per layer
        key = (slots.start, slots.stop)
        held = cache.slot_ids
        if held is None or held[0] != key:
            held = cache.slot_ids = key, torch.arange(slots.start, slots.stop)
        slots = held[1]
    pool = cache.pool
    assert p.gdn is not None  # callers take this path only for a linear-attention layer's plan
    return torch.ops.deltarun.gdn_layer_decode(x, *p.gdn, pool.conv[index], pool.recurrent[index], slots, p.hk,
                                               *p.tail)


def attn_layer(p: Plan, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], caches: list
               ) -> torch.Tensor | None:
    """A full-attention layer's whole decode step (x [B, 1, H] → [B, 1, H]), each row's key and value appended
    to its KVCache; None (nothing done) for int8-quantized caches, which the modules handle."""
    if any(c.quantized for c in caches):
        return None
    for c in caches:
        if c.length + 1 > c.capacity:
            c.make_room(c.length + 1, x.new_empty(p.kv_shape))
    assert p.attn is not None  # callers take this path only for a full-attention layer's plan
    y = torch.ops.deltarun.attn_layer_decode(x, *p.attn, rope[0], rope[1], [c.k for c in caches],
                                             [c.v for c in caches], [c.length for c in caches], *p.attn_rest,
                                             *p.tail)
    for c in caches:
        c.length += 1
    return y


def tail(p: Plan, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The residual add, post-attention norm and MLP of a decode step (x, h [B, 1, H] → [B, 1, H])."""
    return torch.ops.deltarun.layer_tail(x, h, *p.tail)
