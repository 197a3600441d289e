"""CPU decode matmul kernels vs torch's ops: GB/s of weights streamed for one activation row.

Shapes of the 0.8B model (the tied lm_head, in_proj_qkv, MLP up/down); `x.sum()` over 1 GiB first, as the
host's streaming reference (it swings between runs on shared machines: compare within one run).

    python benchmarks/bench_kernels.py [--threads 2] [--reps 10]
    python benchmarks/bench_kernels.py --rows 1,4,8,16    # also bf16 at several rows (batched decode)
    python benchmarks/bench_kernels.py --prefill 512      # also the prefill GEMMs at 512 rows (GFLOP/s)

`--prefill M`: the prefill GEMMs (bf16 weights without hardware bf16: fgemm.cpp; int8 / int4: qgemm.cpp) at M rows,
against torch's fp32 GEMM of the same weight already widened to fp32 (what runs without them, less the widening).
`--rows`: the bf16 kernel against F.linear for M activation rows, each call on the next of enough weight copies
(≥ 256 MB) that the weights stream from memory as in a real step rather than sit in the caches.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from bench_attention import cpu_line  # benchmarks/ is on sys.path when a script here runs

from deltarun.ops import gemv, kernels
from deltarun.ops.int4_layout import int4_reorder

SHAPES = ((248320, 1024), (6144, 1024), (3584, 1024), (1024, 3584))


def seconds(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rows", default="", help="comma-separated row counts for the bf16 many-rows table")
    ap.add_argument("--prefill", type=int, default=0, help="rows for the prefill GEMM table (0: none)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not kernels.available():
        raise SystemExit("the CPU kernels are not available here")
    print(cpu_line())
    big = torch.ones(256 * 1024 * 1024)
    print(f"x.sum() over 1 GiB: {1.0737 / seconds(big.sum, a.reps):.1f} GB/s; torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, int4 layout rows {torch.ops.deltarun.int4_layout_rows()}")
    del big
    print("| weights | N×K | kernel GB/s | torch GB/s |\n|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        x = torch.randn(1, k, generator=g).bfloat16()
        w = torch.randn(n, k, generator=g).bfloat16()
        rows = [("bf16", w.numel() * 2, lambda: gemv.gemv_bf16(x, w), lambda: F.linear(x, w))]
        q, s = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g)
        rows.append(("int8", q.numel(), lambda: gemv.gemv_int8(x, q, s),
                     lambda: torch.ops.aten._weight_int8pack_mm(x, q, s.bfloat16())))
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g), 1)
        sz = (torch.rand(k // 64, n, 2, generator=g) / 10).bfloat16()
        ours4 = int4_reorder(p, kernels.int4_order())  # the byte order our kernel reads here
        rows.append(("int4 g64", n * k // 2, lambda: gemv.int4_mm(x, ours4, 64, sz),
                     lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, 64, sz)))
        for name, nbytes, ours, theirs in rows:
            print(f"| {name} | {n}×{k} | {nbytes / seconds(ours, a.reps) / 1e9:.1f} | "
                  f"{nbytes / seconds(theirs, a.reps) / 1e9:.1f} |", flush=True)
        w = q = p = ours4 = rows = None  # free this shape's tensors before the next ones
    if a.rows:
        many_rows([int(r) for r in a.rows.split(",")], a.reps)
    if a.prefill:
        prefill(a.prefill, a.reps)


def prefill(m: int, reps: int) -> None:
    """GFLOP/s of the prefill GEMMs at m rows against the fp32 GEMM of the widened / dequantized weight."""
    print(f"\nprefill GEMMs, {m} rows (weights in cache: compute)\n"
          "| weights | N×K | kernel GFLOP/s | fp32 GEMM of the widened weight GFLOP/s |\n|---|---|---|---|")
    g = torch.Generator().manual_seed(2)
    for n, k in SHAPES[1:]:
        x = torch.randn(m, k, generator=g).bfloat16()
        w = torch.randn(n, k, generator=g).bfloat16()
        q, s = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g)
        p = int4_reorder(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g), 1), kernels.int4_order())
        sz = (torch.rand(k // 64, n, 2, generator=g) / 10).bfloat16()
        xf, wf = x.float(), w.float()
        cases = [("bf16", kernels.has_bf16w() and (lambda: gemv.gemm_bf16w(x, w, True)))]
        cases.append(("int8", lambda: gemv.qgemm_int8(x, q, s)))
        cases.append(("int4 g64", kernels.has_qgemm_int4() and kernels.int4_order() != 0
                      and (lambda: gemv.qgemm_int4(x, p, 64, sz))))
        for name, ours in cases:
            flop = 2 * m * n * k / 1e9
            mine = f"{flop / seconds(ours, reps):.0f}" if ours else "not built here"
            print(f"| {name} | {n}×{k} | {mine} | {flop / seconds(lambda: F.linear(xf, wf), reps):.0f} |", flush=True)


def many_rows(counts: list[int], reps: int) -> None:
    """bf16 weights at M rows, streaming from memory: ms per call and GFLOP/s, kernel vs F.linear."""
    print(f"\nbf16, weights streaming; kernel takes up to {gemv.max_rows()} rows here\n"
          "| N×K | rows | kernel ms | GFLOP/s | F.linear ms | GFLOP/s |\n|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for n, k in SHAPES[1:]:
        ws = [torch.randn(n, k, generator=g).bfloat16() for _ in range(max(2, (256 << 20) // (n * k * 2)))]
        for m in counts:
            if m > 16:
                continue
            x = torch.randn(m, k, generator=g).bfloat16()
            cells = []
            for fn in (lambda w: gemv.gemv_bf16(x, w, True), lambda w: F.linear(x, w)):
                t = seconds(lambda: [fn(w) for w in ws], reps) / len(ws)
                cells += [f"{t * 1e3:.3f}", f"{2 * m * n * k / t / 1e9:.0f}"]
            print(f"| {n}×{k} | {m} | " + " | ".join(cells) + " |", flush=True)
        ws = []


if __name__ == "__main__":
    main()
