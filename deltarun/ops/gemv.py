"""The CPU kernels' ops as typed functions (csrc/gemv.cpp, norm.cpp, qgemm.cpp): what the rest of deltarun calls
instead of `torch.ops.deltarun.*`, each with its reference named.

Decode multiplies one token per sequence by every weight: memory-bound, and torch's bf16 `F.linear` streams
weights at roughly half the machine's bandwidth for so few rows. The GEMV kernels read each weight row once
for up to 16 activation rows (bf16 weights; int8 weights with a per-row scale; int4 in torch's CPU layout),
with AVX-512 (BF16/VNNI where present) or AVX2+FMA inner loops. Building and checking them: ops/kernels.py.
"""
from __future__ import annotations

import functools

import torch

from . import kernels

MAX_ROWS = 4  # without AVX512-BF16: up to 4 rows the bf16 kernel wins (1.8× at one row); from 8, F.linear's is as fast
TILED_MAX_ROWS = 16  # with it, the tile kernel beats F.linear to 16 rows (weights streaming from memory)
MAX_KERNEL_ROWS = 16  # what the int8 / int4 kernels take in one call (csrc/gemv.cpp MAX_M)


@functools.cache
def max_rows() -> int:
    """Rows up to which a bf16 decode step takes gemv_bf16 and the fused layers (ops/layer.py): 16 where the
    kernel multiplies by AVX512-BF16 tiles, else MAX_ROWS (F.linear or the prefill routes beyond)."""
    return TILED_MAX_ROWS if kernels.available() and torch.ops.deltarun.gemv_bf16_tiled() else MAX_ROWS


def gemv_bf16(x: torch.Tensor, w: torch.Tensor, cast: bool = False) -> torch.Tensor:
    """x [M ≤ 16, K] bf16 · w [N, K] bf16 → [M, N] fp32 (fp32 accumulation), or bf16 (rounded once) with `cast`."""
    return torch.ops.deltarun.gemv_bf16(x, w, cast)


def lora_expand(t: torch.Tensor, mask: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """A LoRA delta's expand for few rows (csrc/lora.cpp): (t ⊙ mask) [M ≤ 16, K] fp32 · bt [K, N] bf16 or fp32
    → [M, N] in bt's dtype, fp32 sums rounded once; reference `(t * mask) @ bt.float()`."""
    return torch.ops.deltarun.lora_expand(t, mask, bt)


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M ≤ 16, K] · (q int8 [N, K] · scales [N]) → [M, N] fp32."""
    return torch.ops.deltarun.gemv_int8(x, q, scales)


def int4_usable(sz: torch.Tensor) -> bool:
    """Whether the int4 kernel multiplies a CPU weight with these (scale, zero) pairs ([K/g, N, 2] bf16)."""
    return sz.dtype == torch.bfloat16 and kernels.has_int4()


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """Weight-only int4 matmul by the kernel, x [M ≤ 16, K] → [M, N] in x's dtype. packed: torch's CPU layout
    [N/B, K, B/2], with each row block's bytes in the build's order (`kernels.int4_order()`: AVX2's column pairs,
    AVX-512's quads; ops/int4_layout.py `int4_reorder`); sz [K/g, N, 2] bf16."""
    return torch.ops.deltarun.gemv_int4(x, packed, group, sz, True)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Weight-only int8 matmul for decode: the kernel up to 16 rows (it beats torch's at every row count
    measured), torch's beyond; x's dtype out."""
    if x.shape[0] <= 16:
        return torch.ops.deltarun.gemv_int8(x, q, scales, True)
    return torch.ops.aten._weight_int8pack_mm(x, q, scales.to(x.dtype))


def fused_norm(x: torch.Tensor) -> bool:
    """Whether x (a decode-sized CPU activation) takes the fused norm ops of csrc/norm.cpp."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and x.numel() <= 65536
            and not torch.is_grad_enabled() and kernels.available())


def gemv_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M ≤ 16, K] · w [N, K] fp32 → [M, N] fp32 (a plain loop: for DeltaNet's tiny fp32 projections)."""
    return torch.ops.deltarun.gemv_f32(x, w)


def qgemm_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Prefill: x [M, K] · (q int8 [N, K] · scales [N] fp32) → [M, N] in x's dtype (csrc/qgemm.cpp)."""
    return torch.ops.deltarun.qgemm_int8(x, q, scales, True)


def qgemm_int4(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """Prefill: x [M, K] · int4 (AVX2 pairs or AVX-512 quads layout, sz [K/g, N, 2]) → [M, N] in x's dtype
    (csrc/qgemm.cpp)."""
    return torch.ops.deltarun.qgemm_int4(x, packed, group, sz, True)


def gemm_bf16w(x: torch.Tensor, w: torch.Tensor, round_out: bool) -> torch.Tensor:
    """Prefill: x [M, K] bf16 · w [N, K] bf16 with fp32 products and sums (csrc/fgemm.cpp); bf16 out when
    `round_out`, else fp32."""
    return torch.ops.deltarun.gemm_bf16w(x, w, round_out)


def rms_norm_zc(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The zero-centred RMSNorm (model/layers.py RMSNorm) in one op, for decode-sized x."""
    return torch.ops.deltarun.rms_norm_zc(x, weight, eps)


def add_rms_norm_zc(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, rms_norm_zc(x + h)) in one op."""
    return torch.ops.deltarun.add_rms_norm_zc(x, h, weight, eps)


def dequant_int8_rows(q: torch.Tensor, scales: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start … end−1 of an int8 weight, dequantized to fp32 (csrc/dequant.cpp)."""
    return torch.ops.deltarun.dequant_int8_rows(q, scales, start, end)


def repack_int4(portable: torch.Tensor, block: int, order: int) -> torch.Tensor:
    """Portable int4 bytes [N, K/2] → torch's CPU layout for row blocks of `block` (in the AVX2 kernel's column-pair
    byte order `order`: int4_layout.int4_reorder), shaped [N, K/2]; one pass (csrc/dequant.cpp). Reference:
    ops/int4_layout.py."""
    return torch.ops.deltarun.repack_int4(portable, block, order)


def dequant_int4_rows(packed: torch.Tensor, sz: torch.Tensor, group: int, block: int, start: int, end: int,
                      order: int) -> torch.Tensor:
    """Rows start … end−1 of a CPU-packed int4 weight, dequantized to fp32 (csrc/dequant.cpp)."""
    return torch.ops.deltarun.dequant_int4_rows(packed, sz, group, block, start, end, order)
