"""Fine-tuning speed and memory (`deltarun finetune`, issue 22) on the 0.8B shape: tokens/s and peak RSS.

Random weights in the official 0.8B layout (written once to ~/.cache/deltarun/bench-0.8b), rank-16 LoRA on every
projection kind (all-linear), synthetic chat data whose rows fill --batch-tokens. Variants: bf16 or fp32 compute ×
gradient checkpointing on or off, each in a fresh process (so its peak RSS is its own). tokens/s counts the packed
rows' tokens over the steps after the first (which warms up allocations). Prints a Markdown table with the CPU.

    python benchmarks/bench_finetune.py --batch-tokens 512 --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = Path("~/.cache/deltarun/bench-0.8b").expanduser()
VARIANTS = {"bf16+ckpt": ("bf16", True), "bf16": ("bf16", False), "fp32+ckpt": ("fp32", True), "fp32": ("fp32", False)}


def write_data(path: Path, n: int, seed: int = 0) -> None:
    words = "the a model learns from data every step small adapter tokens answer question system cpu fast".split()
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            answer = " ".join(rng.choice(words) for _ in range(600))
            f.write(json.dumps({"messages": [{"role": "user", "content": "Tell me something."},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def child(a: argparse.Namespace) -> None:
    from deltarun.train import finetune

    stamps: list[float] = []
    res = finetune(a.model, a.data, a.out, rank=16, alpha=32, steps=a.steps, batch_tokens=a.batch_tokens,
                   compute=a.compute, checkpointing=a.ckpt == "on", progress=False, threads=a.threads,
                   on_step=lambda step, loss: stamps.append(time.perf_counter()))
    timed = (a.steps - 1) * a.batch_tokens  # every row is full: one conversation is longer than a row
    print(json.dumps({"tok_s": timed / (stamps[-1] - stamps[0]), "rss_gib": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**20, "loss": res.losses[-1]}))


def cpu() -> tuple[str, str]:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("Flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    return name, " ".join(f for f in wanted if f in flags)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--batch-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--compute", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    if not (a.model / "config.json").is_file():
        from deltarun.weights.random_init import write_random_checkpoint
        write_random_checkpoint("0.8B", a.model, seed=0, tokenizer=False)
    name, flags = cpu()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        write_data(data, a.steps)
        for v in a.variants.split(","):
            compute, ckpt = VARIANTS[v]
            cmd = [sys.executable, __file__, "--child", "--model", str(a.model), "--data", str(data), "--out",
                   str(Path(tmp) / v), "--compute", compute, "--ckpt", "on" if ckpt else "off",
                   "--batch-tokens", str(a.batch_tokens), "--steps", str(a.steps)]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode:
                sys.exit(f"{v} failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(f"| {compute} | {'on' if ckpt else 'off'} | {r['tok_s']:.1f} | {r['rss_gib']:.2f} |")
            print(rows[-1], file=sys.stderr)
    print(f"CPU: {name} ({flags}); load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"0.8B shape, rank 16 all-linear, --batch-tokens {a.batch_tokens}, {a.steps} steps (first not timed)\n")
    print("| compute | checkpointing | tokens/s | peak RSS GiB |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
