"""The `DELTARUN_*` switches of the CPU kernels and routes, read from the environment in one place, once.

| variable | default | effect |
|---|---|---|
| DELTARUN_CPU_KERNELS | 1 | 0: build no C++ kernels; every op runs on torch's |
| DELTARUN_CPU_LEVEL | native | avx2 / avx512 / avx512_bf16: build for, and route as, that x86 level |
| DELTARUN_KERNELS_DIR | ~/.cache/deltarun/kernels | where the kernels are built |
| DELTARUN_PREFILL_GEMM | 1 | 0: no integer / bf16-weight prefill GEMMs (quantized prefill dequantizes) |
| DELTARUN_ONEDNN | 1 | 0: widened fp32 prefill matmuls use F.linear instead of oneDNN |
| DELTARUN_FUSED_LAYERS | 1 | 0: decode runs the modules, not the fused C++ layers |
| DELTARUN_HUGEPAGES | 1 | 0: weights deltarun fills itself go on ordinary pages, not 2 MB ones (ops/memory.py) |

Routes are chosen when a model is loaded (ops/routes.py), so a switch changed later affects models loaded
after `reload()` (tests use it; a process reads its environment once).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    cpu_kernels: bool
    cpu_level: str | None  # as given (lower-cased); validated by ops/kernels.py `cpu_level`
    kernels_dir: Path
    prefill_gemm: bool
    onednn: bool
    fused_layers: bool
    hugepages: bool

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        on = lambda name: env.get(name, "1") != "0"  # noqa: E731
        return cls(cpu_kernels=on("DELTARUN_CPU_KERNELS"),
                   cpu_level=env.get("DELTARUN_CPU_LEVEL", "").strip().lower() or None,
                   kernels_dir=Path(env.get("DELTARUN_KERNELS_DIR") or Path.home() / ".cache" / "deltarun" / "kernels"),
                   prefill_gemm=on("DELTARUN_PREFILL_GEMM"), onednn=on("DELTARUN_ONEDNN"),
                   fused_layers=on("DELTARUN_FUSED_LAYERS"), hugepages=on("DELTARUN_HUGEPAGES"))


_current: list[Settings] = []


def settings() -> Settings:
    """The switches, read from the environment on first use."""
    if not _current:
        _current.append(Settings.from_env())
    return _current[0]


def reload() -> Settings:
    """Read the environment again (after a test changed a switch)."""
    _current[:] = [Settings.from_env()]
    return _current[0]
