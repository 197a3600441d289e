"""How many CPU threads torch's kernels use: `threads`, else $DELTARUN_THREADS, else every core we may run on."""
from __future__ import annotations

import os

import torch


def set_threads(threads: int | None = None) -> int:
    """Set and return the thread count. torch's default can be fewer than the cores a container allows;
    more threads than cores (oversubscription) makes the bf16 kernels many times slower."""
    n = threads or int(os.environ.get("DELTARUN_THREADS", "0") or 0) or len(os.sched_getaffinity(0))
    if n < 1:
        raise ValueError(f"threads must be >= 1, not {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
