"""`deltarun bench` (deltarun/bench.py) and how benchmarks/bench_cpu.py reads other programs' memory.

What is checked: the CLI's table and its "paths that ran" lines against a model loaded here
(ops/routes.py `describe`, and the fused decode layers switch); the child's memory readings against
pages this test touches; and bench_cpu's launcher, whose peak RSS for a small program must stay small when
the process that starts it is large (plain wait4 from a large parent reports the parent's high-water mark).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from deltarun import bench
from deltarun.ops import kernels, routes
from deltarun.weights.loader import load_model

ROOT = Path(__file__).resolve().parents[1]


def _bench_cli(folder: Path, variants: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deltarun.cli", "bench", str(folder), "--variants", variants, "--prompt-lens", "20",
           "--gen-len", "3", "--reps", "1", "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def _paths(out: str) -> dict[str, str]:
    tail = out.split("paths that ran:\n", 1)[1]
    return {ln.split(":", 1)[0]: ln for ln in tail.strip().splitlines()}


def test_bench_cli_reports_the_routes_and_fused_layers_that_ran(tiny_ckpt):
    proc = _bench_cli(tiny_ckpt, "bf16,int8")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\| bf16 \| [\d.]+ \| [\d.]+ \| [\d.]+ / [\d.]+ / [\d.]+ \|", proc.stdout, re.M), proc.stdout
    lines = _paths(proc.stdout)
    assert set(lines) == {"bf16", "int8"}
    n_layers = len(load_model(tiny_ckpt, dtype="bfloat16", device="cpu").config.text.layer_types)
    for variant, quant in (("bf16", None), ("int8", "int8")):
        model = load_model(tiny_ckpt, dtype="bfloat16", device="cpu", quantization=quant)
        for (phase, route), n in routes.describe(model).items():
            assert f"{phase}:{route} ×{n}" in lines[variant], (variant, lines[variant])
        assert re.search(rf"fused decode layers \d+/{n_layers};", lines[variant]), lines[variant]
        attn = "attn_bf16 (bf16)" if kernels.has_attn() else "torch flash"
        assert f"; prefill attention {attn};" in lines[variant], lines[variant]
    off = _bench_cli(tiny_ckpt, "bf16", DELTARUN_FUSED_LAYERS="0")
    assert off.returncode == 0, off.stderr
    assert f"fused decode layers 0/{n_layers};" in _paths(off.stdout)["bf16"]


def test_memory_readings_follow_touched_pages():
    before = bench.memory_gb()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    during = bench.memory_gb()
    del x
    assert during["VmRSS"] - before["VmRSS"] > 60 / 1024
    # the kernel's RSS counters are batched per task (a few hundred KB of slack): the peak keeps the 64 MiB
    assert during["VmHWM"] - before["VmRSS"] > 60 / 1024
    assert bench.memory_gb()["VmHWM"] - before["VmRSS"] > 60 / 1024


def test_launcher_peak_rss_is_the_programs_own_not_its_parents():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_cpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    big = torch.ones(768 * 2**20 // 4)  # this process: > 0.75 GiB resident
    small = [sys.executable, "-S", "-c", "b = bytearray(48 * 2**20); print(len(b))"]
    info, out, _ = bench_cpu.launch(small)
    assert info["rc"] == 0 and out.strip() == str(48 * 2**20)
    assert 0.04 < info["rss_gb"] < 0.25, info
    assert info["wall_s"] > 0
    # the reading the launcher replaces: wait4 on a child started straight from this large process
    proc = subprocess.Popen(small, stdout=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    assert usage.ru_maxrss / 2**20 > 0.7, "plain wait4 no longer inherits the parent's mark: the launcher may go"
    del big
