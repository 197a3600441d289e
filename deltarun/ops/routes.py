"""The route table: which op multiplies a linear's input, by precision × phase, chosen once per module at load.

| precision | phase | routes in preference order (the first whose condition holds here) |
|---|---|---|
| bf16 | decode (≤ gemv.max_rows(): 16 with AVX512-BF16, else 4) | gemv_bf16 (kernels built) · torch |
| bf16 | prefill | torch (bf16 matmul in hardware, or not the CPU) · gemm_bf16w (fgemm.cpp) · fp32_widened |
| int8 | decode (< quant.PREFILL_ROWS rows) | gemv_int8 (CPU, kernels built) · int8pack (torch) · dequant |
| int8 | prefill | qgemm_int8 (decode on gemv_int8, K % 32 = 0, `DELTARUN_PREFILL_GEMM`) · dequant |
| int4 | decode | gemv_int4 (torch's int4 layout in our byte order) · int4pack (torch, CPU or CUDA) · dequant |
| int4 | prefill | qgemm_int4 (AVX2 pairs / AVX-512 VNNI quads, group % 32 = 0, `DELTARUN_PREFILL_GEMM`) · dequant (†) |
| any | training (grad enabled) | torch (F.linear / dequant), so autograd sees plain ops |

(†) Where gemv_int4 runs without qgemm_int4 (AVX-512 without VNNI), calls of 16 to quant.KERNEL_BLOCK_ROWS rows
take gemv_int4 16 rows at a time; only larger ones dequantize.
"dequant" is the reference every quantized route is checked against when its module is packed (a route
that disagrees on a probe input is not used: the module keeps the reference). "torch" for bf16 is F.linear.
Where the CPU level lacks a kernel (DELTARUN_CPU_LEVEL, ops/kernels.py), its condition is false and the
next route runs. An adapter (LoRA) adds its output on top of any route (`Linear.delta`).
bf16 Linears get their routes from `assign`; quantized ones choose theirs in `QuantLinear.pack`
(ops/quant.py) by this same table, and both record the chosen names in `module.routes`.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from . import kernels
from .linear import Linear
from .settings import settings

TABLE: dict[tuple[str, str], tuple[str, ...]] = {
    ("bf16", "decode"): ("gemv_bf16", "torch"),
    ("bf16", "prefill"): ("torch", "gemm_bf16w", "fp32_widened"),
    ("int8", "decode"): ("gemv_int8", "int8pack", "dequant"),
    ("int8", "prefill"): ("qgemm_int8", "dequant"),
    ("int4", "decode"): ("gemv_int4", "int4pack", "dequant"),
    ("int4", "prefill"): ("qgemm_int4", "dequant"),
}


def first(precision: str, phase: str, holds: dict[str, bool]) -> str:
    """The first route of the table's row whose condition holds (`holds`: route → condition; routes not
    named there hold)."""
    return next(r for r in TABLE[precision, phase] if holds.get(r, True))


def bf16_routes(weight: torch.Tensor) -> dict[str, str]:
    """A bf16 Linear's routes, from this machine's kernels and the switches."""
    cpu = weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.is_contiguous()
    built = cpu and kernels.available()
    wide = cpu and not kernels.native_bf16_matmul()
    return {"decode": first("bf16", "decode", {"gemv_bf16": built}),
            "prefill": first("bf16", "prefill", {"torch": not wide,
                                                 "gemm_bf16w": kernels.has_bf16w() and settings().prefill_gemm})}


def assign(model: nn.Module) -> int:
    """Choose the routes of every bf16 `Linear` in `model` (weights stay untouched, so tying and state_dict
    are as they were). Returns how many take a route other than F.linear."""
    n = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.dtype == torch.bfloat16:
            m.routes = bf16_routes(m.weight)
            n += m.routes != {"decode": "torch", "prefill": "torch"}
    return n


def describe(model: nn.Module) -> Counter:
    """How many linears of `model` take each (phase, route): what `deltarun bench` and tests report."""
    tables = (getattr(m, "routes", None) for m in model.modules())
    return Counter((phase, r) for routes in tables if isinstance(routes, dict) for phase, r in routes.items())
