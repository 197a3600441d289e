"""How close CPU decode comes to the memory-bandwidth limit: bytes a decode step reads, the machine's read
bandwidth, the tokens/s that allows, and deltarun's measured decode speed as a fraction of it.

A decode step reads every weight once (the tied embedding as the lm_head; vision tower and MTP head not at
all) plus the DeltaNet states, so limit = bandwidth / bytes. The bandwidth is `x.sum()` over 1 GiB of fp32
on the same threads, measured between the decode runs (it swings 30–50% on shared machines: read the
ratios, not the absolutes). Decode runs in fresh processes (`deltarun.bench`, 128 tokens after 16).

    python benchmarks/bench_bandwidth.py                        # the random 0.8B checkpoint of bench_cpu.py
    python benchmarks/bench_bandwidth.py --variants bf16 --reps 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import DEFAULT_MODEL, ensure_model  # noqa: E402

from deltarun import bench  # noqa: E402


def decode_bytes(folder: Path, variant: str) -> tuple[int, int]:
    """(weight bytes, recurrent-state bytes) one decode token reads, for the model as `variant` loads it."""
    from deltarun.weights.loader import load_model

    dtype, quant = bench.split_variant(variant)
    model = load_model(folder, dtype=dtype, device="cpu", quantization=quant)
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()

    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and "visual" not in name and not name.startswith("mtp") and ".mtp." not in name:
            add(t)
    for m in model.modules():  # kernel layouts held beside the state dict (ops/quant.py)
        k = getattr(m, "_kernel", None)
        for t in [getattr(k, "packed", None), *getattr(k, "args", ())] if k is not None else []:
            if isinstance(t, torch.Tensor):
                add(t)
    cfg = model.config.text
    n_linear = sum(t == "linear_attention" for t in cfg.layer_types)
    state = n_linear * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    return total, 2 * state  # the state is read and written back


def read_bandwidth(threads: int, reps: int = 9) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    x.sum()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--variants", default="bf16,int8,int4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    model = ensure_model(a.model)
    variants = a.variants.split(",")
    sizes = {v: decode_bytes(model, v) for v in variants}
    tps: dict[str, list[float]] = {v: [] for v in variants}
    bw: list[float] = []
    for rep in range(a.reps):  # bandwidth measured between the decode runs, interleaved
        for v in variants:
            bw.append(read_bandwidth(a.threads))
            r = bench.run_variant(str(model), v, [16], 128, a.threads)
            if "error" in r:
                sys.exit(f"{v}: {r['error']}")
            tps[v].append(r["tg128"])
            print(f"  rep {rep + 1} {v}: {r['tg128']:.2f} tok/s, x.sum {bw[-1] / 1e9:.1f} GB/s", file=sys.stderr)
    gbs = statistics.median(bw)
    print(f"read bandwidth (x.sum over 1 GiB, {a.threads} threads, median of {len(bw)}): {gbs / 1e9:.1f} GB/s\n")
    print("| variant | GB read a token | limit tok/s | decode tok/s | of the limit |\n|---|---|---|---|---|")
    for v in variants:
        w, s = sizes[v]
        limit, got = gbs / (w + s), statistics.median(tps[v])
        print(f"| {v} | {(w + s) / 1e9:.3f} | {limit:.1f} | {got:.2f} | {got / limit:.0%} |")


if __name__ == "__main__":
    main()
