"""Prompt attention on the CPU: deltarun's bf16 kernel (ops/csrc/attn.cpp) vs torch's path for the same call.

Shapes of the 0.8B model: text (8 query / 2 KV heads, head size 256; chunks of T queries over S keys, causal) and
the vision tower (one 1024×768 image frame: 3,072 patches, 12 heads of 64, bidirectional). "torch" is what
ops/attention.py runs without the kernel: causal SDPA for a whole prompt, the prefix + diagonal flash split for a
chunk after a cache, plain SDPA for a vision frame. Medians of interleaved calls; GFLOP/s counts 4·D per visible
query-key pair and head. Prints the CPU model and flags first: keep one table per CPU class.

    python benchmarks/bench_attention.py [--reps 5] [--threads 2] [--long]   # --long adds 2,048 queries at 32K
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from deltarun.ops import attention as att
from deltarun.ops import kernels

# (label, batch, query heads, KV heads, T, S, head size, causal)
CASES = [
    ("prompt 512", 1, 8, 2, 512, 512, 256, True),
    ("prompt 2,048", 1, 8, 2, 2048, 2048, 256, True),
    ("chunk 512 after 4,096", 1, 8, 2, 512, 4608, 256, True),
    ("16 queries over 4,000 keys", 1, 8, 2, 16, 4000, 256, True),
    ("8 queries over 4,000 keys", 1, 8, 2, 8, 4000, 256, True),
    ("16 queries over 40,000 keys", 1, 8, 2, 16, 40000, 256, True),
    ("vision frame 3,072 patches", 1, 12, 12, 3072, 3072, 64, False),
]
LONG = [("chunk 2,048 after 30,720", 1, 8, 2, 2048, 32768, 256, True)]


def torch_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return att._prefix_and_diagonal(q, k, v, q.shape[-1] ** -0.5)


def flops(t: int, s: int, hq: int, d: int, causal: bool) -> float:
    pairs = t * (s - t) + t * (t + 1) / 2 if causal else t * s
    return 4.0 * d * hq * pairs


def cpu_line() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu: unavailable"
    rows = dict(ln.split(":", 1) for ln in info.splitlines() if ":" in ln)
    flags = [f for f in rows.get("Flags", "").split() if any(x in f for x in ("avx", "amx", "vnni", "bf16", "fma"))]
    return f"{rows.get('Model name', '?').strip()}; {' '.join(flags)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long", action="store_true", help="also 2,048 queries at depth 32K (~20 s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_line())
    if not kernels.has_attn():
        print("the bf16 attention kernel is not built here (it needs AVX512-BF16): nothing to compare")
        return
    print("\n| case | torch ms | kernel ms | kernel GFLOP/s | speed-up |\n|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for label, b, hq, hkv, t, s, d, causal in CASES + (LONG if args.long else []):
        q = torch.randn(b, hq, t, d, generator=g).bfloat16()
        k, v = (torch.randn(b, hkv, s, d, generator=g).bfloat16() for _ in range(2))
        ours = lambda: torch.ops.deltarun.attn_bf16(q, k, v, d ** -0.5, causal)  # noqa: E731
        theirs = lambda: torch_path(q, k, v, causal)  # noqa: E731
        ours(), theirs()
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for _ in range(args.reps):
            for name, fn in (("ours", ours), ("theirs", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        a, b_ = statistics.median(times["ours"]), statistics.median(times["theirs"])
        print(f"| {label} | {b_ * 1e3:.1f} | {a * 1e3:.1f} | {flops(t, s, hq, d, causal) / a / 1e9:.0f} | "
              f"{b_ / a:.2f}× |")


if __name__ == "__main__":
    main()
