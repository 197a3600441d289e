"""Cost of picking the next token: `ops.sampling.sample` on [B, 248,320] logits (Qwen3.5's vocabulary) under
common request settings, and optionally whole decode runs at those settings.

The sampler runs once per decode step on every row, so its time adds to each token: at 1 row a 0.8B int4 step
is ~18 ms on a 2-core CPU, and a full-vocabulary draw by `torch.multinomial` alone was ~5 ms of it.

    python benchmarks/bench_sampling.py                      # sampler alone, B = 1 and 16
    python benchmarks/bench_sampling.py --decode ~/.cache/deltarun/bench-0.8b-tok/quantized-int4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_attention import cpu_line  # noqa: E402

from deltarun import LLM, SamplingParams  # noqa: E402
from deltarun.ops.sampling import SamplerState, sample  # noqa: E402

VOCAB = 248_320
SETTINGS = {  # name → SamplingParams fields (unset knobs neutral, as a request without a model card gets them)
    "greedy": dict(temperature=0.0),
    "temperature 1, full vocabulary": dict(temperature=1.0, top_k=0, top_p=1.0),
    "temperature 0.7, top-k 20, top-p 0.8 (card)": dict(temperature=0.7, top_k=20, top_p=0.8),
    "temperature 1, min-p 0.05": dict(temperature=1.0, top_k=0, min_p=0.05),
    "temperature 1, top-p 0.9, top-k off": dict(temperature=1.0, top_k=0, top_p=0.9),
}


def time_sampler(rows: int, fields: dict, reps: int) -> float:
    """Median ms of one `sample` call on [rows, VOCAB] bf16 logits."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, VOCAB, generator=g) * 3).to(torch.bfloat16)
    states = [SamplerState(SamplingParams(seed=i, **fields).with_defaults({}), [1, 2, 3], VOCAB, torch.device("cpu"),
                           ()) for i in range(rows)]
    sample(logits, states)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sample(logits, states)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16", help="batch sizes (comma-separated)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", type=Path, help="also decode 64 tokens per setting with this model folder")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [int(r) for r in a.rows.split(",")]
    print(f"{cpu_line()}; {a.threads} threads\n")
    print("| setting | " + " | ".join(f"sample ms, {r} row{'s' * (r > 1)}" for r in rows)
          + (" | decode tok/s, 1 row |" if a.decode else " |"))
    print("|---|" + "---|" * (len(rows) + bool(a.decode)))
    llm = LLM(str(a.decode), threads=a.threads, mtp="off") if a.decode else None
    for name, fields in SETTINGS.items():
        cells = [f"{time_sampler(r, fields, a.reps):.2f}" for r in rows]
        if llm is not None:
            params = SamplingParams(max_tokens=64, ignore_eos=True, seed=1, **fields)
            llm.generate("Hello there", params)
            rates = []
            for _ in range(3):
                t = time.perf_counter()
                llm.generate("Hello there", params)
                rates.append(64 / (time.perf_counter() - t))
            cells.append(f"{statistics.median(rates):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
