"""Buffers for the weights a decode step streams: `weight_empty` puts a large CPU weight on 2 MB pages.

Why: every decode token reads all the weights once, and how fast that read runs depends on where the weight's pages
lie, not only on the kernel. An int8 weight quantized while loading, block by block with each block's temporaries
allocated in between, lands on 4 KB pages scattered over physical memory: the 0.8B's int8 matmuls streamed at
~75% of `x.sum()`'s rate from there and at ~83% from 2 MB pages (each 2 MB contiguous, and one TLB entry where 512
were, which counts double in a VM, where a TLB miss walks two page tables). Whole int8 models, fresh processes:
decode +5%, prefill +8% (`benchmarks/bench_ab.py --before . --after . --before-env DELTARUN_HUGEPAGES=0`). The int4
kernel layout on 2 MB pages lost ~9% of prefill (some processes 20%) and gained nothing in decode, so it is not
placed here. A mapped checkpoint's bf16 weights come from the page cache, often in large folios already.

How: an anonymous mapping, aligned to 2 MB, advised MADV_HUGEPAGE (honoured where transparent huge pages are
`always` or `madvise`, the common defaults; elsewhere it is ordinary memory). The tensor keeps the mapping alive and
unmaps it when freed. Below 2 MB, off Linux, or with DELTARUN_HUGEPAGES=0: torch.empty.
"""
from __future__ import annotations

import math
import mmap
import sys

import torch

from .settings import settings

HUGE = 2 << 20  # x86-64's transparent huge page


def weight_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of `shape` and `dtype`, on 2 MB pages where it spans at least one."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE or not settings().hugepages or not sys.platform.startswith("linux") \
            or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    off = -start % HUGE
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, off, nbytes)
    except OSError:  # a kernel without transparent huge pages: ordinary pages, same bytes
        pass
    # the tensor holds the mapping (frombuffer keeps its buffer alive) and nothing else does: freed with it
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=off).view(dtype).view(shape)
