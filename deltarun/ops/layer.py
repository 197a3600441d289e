"""Decoder layers' decode steps as single C++ ops (csrc/layer.cpp) on the CPU.

A 0.8B decode step makes ~700 Python-level calls (modules, views, small ops, kernels); at ~10–15 µs each
they cost as much as the int4 matmuls themselves. Where every linear of a layer runs on one of our
kernels, the layer's decode step is one op that calls those same kernels in the same order, so its
output is bit for bit the modules' (tests/test_fused_layer.py). The tensors each kernel reads are
gathered once per layer here (`plan`); anything else (prefill, more than MAX_ROWS sequences, a
speculative verify, weights without a kernel, CUDA) runs the modules as before.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from . import gemv

_NO = object()  # cached "this layer has no fused plan"


def linear_args(mod: nn.Module) -> list[torch.Tensor] | None:
    """The tensors of the kernel `mod` runs on a few bf16 rows (csrc/layer.cpp's encoding), or None when
    it would run something else."""
    from .quant import QuantLinear

    if isinstance(mod, gemv.DecodeLinear):
        return [mod.weight] if mod.bias is None and mod.weight.is_contiguous() else None
    if type(mod) is nn.Linear:  # DeltaNet's fp32 in_proj_a / in_proj_b take gemv_f32
        w = mod.weight
        return [w] if mod.bias is None and w.dtype == torch.float32 and w.is_contiguous() else None
    if isinstance(mod, QuantLinear) and mod.dtype == torch.bfloat16 and mod._kernel is not None:
        k = mod._kernel
        if k.op is gemv.int8_mm:  # [q, fp32 scales]
            return [k.packed, *k.args]
        if k.op is gemv.int4_mm:  # [packed, sz]: only ever this build's layout (quant.py `_int4_kernel`)
            return [k.packed, k.sz]
    return None


@dataclass
class Plan:
    tail: tuple  # (post_norm, eps, gate, up, down)
    gdn: tuple | None = None  # a linear-attention layer's arguments before the pools
    hk: int = 0
    attn: tuple | None = None  # a full-attention layer's arguments before the rotary tables
    attn_rest: tuple = ()  # … and between the caches' lengths and the tail
    kv_shape: tuple = ()  # [1, Hkv, 1, D]: what a KV cache grows by


def plan(layer: nn.Module) -> Plan | None:
    """The layer's fused-decode arguments, built on first use and cached on the layer (None: no plan)."""
    p = layer.__dict__.get("_decode_plan")
    if p is None:
        p = _build(layer) or _NO
        layer.__dict__["_decode_plan"] = p
    return None if p is _NO else p


def reset(model: nn.Module) -> None:
    """Forget the cached plans (after `DELTARUN_FUSED_LAYERS` or the kernels' availability changed)."""
    for m in model.modules():
        m.__dict__.pop("_decode_plan", None)


def _build(layer: nn.Module) -> Plan | None:
    if os.environ.get("DELTARUN_FUSED_LAYERS", "1") == "0" or not gemv.available():
        return None
    mlp, post = layer.mlp, layer.post_attention_layernorm
    lins = [linear_args(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    if any(a is None for a in lins) or post.weight.device.type != "cpu":
        return None
    p = Plan(tail=(post.weight, post.eps, *lins))
    if layer.layer_type == "linear_attention":
        la = layer.linear_attn
        mods = (la.in_proj_qkv, la.in_proj_z, la.in_proj_a, la.in_proj_b)
        proj = [linear_args(m) for m in mods]
        out = linear_args(la.out_proj)
        if any(a is None for a in proj) or out is None or la.norm.weight.dtype != torch.bfloat16:
            return p
        conv_w = la.conv1d.weight.view(la.conv_dim, -1).contiguous()
        p.gdn = (layer.input_layernorm.weight, layer.input_layernorm.eps, *proj, conv_w,
                 la.A_log.float().contiguous(), la.dt_bias.float().contiguous(), la.norm.weight, la.norm.eps, out)
        p.hk = la.hk
    else:
        at = layer.self_attn
        proj = [linear_args(m) for m in (at.q_proj, at.k_proj, at.v_proj, at.o_proj)]
        if any(a is None for a in proj) or not at.gated:
            return p
        p.attn = (layer.input_layernorm.weight, layer.input_layernorm.eps, *proj[:3], at.q_norm.weight,
                  at.q_norm.eps, at.k_norm.weight, at.k_norm.eps)
        p.attn_rest = (at.nq, at.nkv, at.scale, proj[3])
        p.kv_shape = (1, at.nkv, 1, at.d)
    return p


def usable(x: torch.Tensor) -> bool:
    """Whether x [B, T, H] is a decode step the fused ops take: one bf16 token per row, few rows, no grad."""
    return (x.shape[1] == 1 and x.shape[0] <= gemv.MAX_ROWS and x.dtype == torch.bfloat16
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
    y = torch.ops.deltarun.attn_layer_decode(x, *p.attn, rope[0], rope[1], [c.k for c in caches],
                                             [c.v for c in caches], [c.length for c in caches], *p.attn_rest,
                                             *p.tail)
    for c in caches:
        c.length += 1
    return y


def tail(p: Plan, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The residual add, post-attention norm and MLP of a decode step (x, h [B, 1, H] → [B, 1, H])."""
    return torch.ops.deltarun.layer_tail(x, h, *p.tail)
