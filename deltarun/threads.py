"""CPU threads for torch's kernels: how many (`set_threads`), and giving a thread's OpenMP workers back
(`release_pool`) when the work moves to another thread."""
from __future__ import annotations

import ctypes
import functools
import os

import torch


def set_threads(threads: int | None = None) -> int:
    """Set and return the thread count: `threads`, else $DELTARUN_THREADS, else every core we may run on.
    torch's default can be fewer than the cores a container allows; more threads than cores
    (oversubscription) makes the bf16 kernels many times slower."""
    n = threads or int(os.environ.get("DELTARUN_THREADS", "0") or 0) or len(os.sched_getaffinity(0))
    if n < 1:
        raise ValueError(f"threads must be >= 1, not {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's kernels use (already loaded: found in this process's mappings), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/lib" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")):
            lib = ctypes.CDLL(path)
            if hasattr(lib, "omp_pause_resource_all"):
                return lib
    return None


def release_pool() -> bool:
    """End the OpenMP worker threads of the calling thread's pool (OpenMP 5's omp_pause_resource_all);
    the next parallel op on this thread starts new ones. Returns whether the runtime did it.

    Each thread that runs parallel torch ops keeps its own pool of workers. While workers exist beyond
    the cores, libgomp stops letting them spin between parallel regions: every region then sleeps and
    wakes them through futexes (~3,000 context switches a second), which made decode on the engine
    thread 20–35% slower than the same steps on the thread that had loaded the model. So a thread that
    did torch work (loading, image preprocessing) and hands the computing to another gives its pool back.
    """
    lib = _openmp()
    return lib is not None and lib.omp_pause_resource_all(2) == 0  # 2 = omp_pause_hard
