"""Default memory budgets: how much of the free RAM (or GPU memory) the engine may use for state.

Running sequences (KV + DeltaNet slots) get half of what is free when the engine starts; the prefix
cache gets a tenth, at most 2 GiB. Both are overridable (`--max-memory`, `--prefix-cache-memory`).
"""
from __future__ import annotations

import os

import torch

GiB = 1 << 30


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_budgets(device: torch.device) -> tuple[int, int]:
    free = free_bytes(device)
    return free // 2, min(2 * GiB, free // 10)


def parse_size(text: str) -> int:
    """'8G', '512MiB', '1.5GB', '1073741824' → bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t))
    except ValueError:
        raise ValueError(f"cannot read memory size {text!r} (use e.g. 8G, 512M)") from None
