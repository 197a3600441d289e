"""torch's CPU int4 layout and our kernels' byte orders within its row blocks (the AVX2 column pairs, the AVX-512
quads): what both the kernels (gemv.py's self-check) and the quantized modules (quant.py) need to read packed
int4 weights. The order a build reads is `torch.ops.deltarun.int4_order()`: 0 torch's, 1 pairs, 2 quads."""
from __future__ import annotations

import torch

_cpu_block: list[int] = []


def cpu_int4_block() -> int:
    """Rows per block B of torch's CPU int4 layout, [N/B, K, B/2] bytes with rows n%B < B/2 in the low
    nibble: it follows torch's CPU capability (64 with AVX-512, 32 with AVX2), so it is read off a probe
    packed once; 0 if the layout is neither (then only torch's own kernel reads it)."""
    if not _cpu_block:
        q = torch.randint(0, 16, (64, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        got = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).flatten()
        _cpu_block.append(next((b for b in (64, 32) if torch.equal(got, cpu_layout(q, b).flatten())), 0))
    return _cpu_block[0]


# The AVX2 kernel's order of each column pair's 32 bytes in the 32-row layout (csrc/gemv_avx2.h): position p
# holds torch's byte (p mod 2)·16 + (p div 16)·8 + (p mod 16) div 2, i.e. row pairs ready for vpmaddubsw.
PAIRS = torch.tensor([(p % 2) * 16 + (p // 16) * 8 + (p % 16) // 2 for p in range(32)])
UNPAIRS = torch.argsort(PAIRS)


# The AVX-512 kernel's order of each 4 columns' 128 bytes in the 64-row layout (csrc/gemv_kernels.h): position p
# holds torch's byte (k, j) = (p mod 4, 16·(p div 64) + (p mod 64) div 4), i.e. 32-bit lanes of one row's 4 columns.
QUADS = torch.tensor([(p % 4) * 32 + (p // 64) * 16 + (p % 64) // 4 for p in range(128)])
UNQUADS = torch.argsort(QUADS)


def int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """torch's 32-row CPU int4 bytes ([N/32, K, 16] in memory, K even) → the AVX2 kernel's column-pair
    order, same shape."""
    return packed.reshape(-1, 32)[:, PAIRS].view(packed.shape)


def int4_reorder(packed: torch.Tensor, order: int) -> torch.Tensor:
    """torch's CPU int4 bytes → byte order `order` within each row block (0: as they are; 1: `int4_pairs`, 32-row
    blocks; 2: quads, 64-row blocks, K a multiple of 4), same shape."""
    if order == 1:
        return int4_pairs(packed)
    if order == 2:
        return packed.reshape(-1, 128)[:, QUADS].view(packed.shape)
    return packed


def cpu_layout(q: torch.Tensor, block: int) -> torch.Tensor:
    """q [N, K] in 0…15 → torch's CPU int4 bytes [N/B, K, B/2] for row blocks of B (see cpu_int4_block)."""
    r = q.to(torch.uint8).view(-1, 2, block // 2, q.shape[1])
    return (r[:, 0] | r[:, 1] << 4).transpose(1, 2).contiguous()


def cpu_layout_from_portable(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Portable int4 bytes [N, K/2] (even columns in the low nibble) → torch's CPU layout as `cpu_layout` gives
    it for the unpacked values, shaped [N, K/2] as torch's own packing op returns it; N a multiple of `block`.
    Nibble arithmetic on bytes: 10× faster than torch's op on the int32 values, no [N, K] copy."""
    n, half = packed.shape
    p = packed.view(-1, 2, block // 2, half)
    lo, hi = p[:, 0], p[:, 1]  # rows n % B < B/2 go to the low nibble, the rest to the high one
    even = (lo & 15) | (hi << 4)  # column 2c
    odd = (lo >> 4) | (hi & 0xF0)  # column 2c + 1
    out = torch.stack((even, odd), dim=-1).view(-1, block // 2, 2 * half)  # [N/B, B/2, K]
    return out.transpose(1, 2).contiguous().view(n, half)
