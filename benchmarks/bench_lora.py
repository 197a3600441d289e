"""Multi-LoRA decode: tokens/s of a batch of 8 with 0, 1 and 4 distinct adapters (issue 22).

The Qwen3.5-0.8B shape with random weights (speed does not depend on the values) and random rank-16 PEFT
adapters on every decoder projection (attention, MLP, DeltaNet), written here in PEFT's format. One engine;
the configurations are interleaved, `--reps` times, and the medians printed with their ratio to no adapter.
Each measurement: 8 requests (prompts of 32 tokens) are prefilled, then `--steps` decode steps are timed
(each one forward over the 8 rows). "1 adapter" = all 8 rows on one adapter; "4" = two rows on each of 4.

    .venv/bin/python benchmarks/bench_lora.py                     # bf16, 0 / 1 / 4 adapters
    .venv/bin/python benchmarks/bench_lora.py --quantize int4 --reps 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]


def cpu_label() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{info.get('Model name', '?').strip()} ({' '.join(keep)}), {info.get('CPU(s)', '?').strip()} CPUs"


def write_adapter(model, out: Path, rank: int, seed: int) -> Path:
    """A PEFT LoRA folder for `model` (a loaded Qwen3_5ForCausalLM) with random A and B on every TARGETS module."""
    from deltarun.weights.lora import _linears

    if (out / "adapter_model.safetensors").is_file():
        return out
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in _linears(model).items():
        fan_in, fan_out = mod.in_features, mod.out_features
        key = "base_model.model." + name
        tensors[key + ".lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * fan_in ** -0.5
        tensors[key + ".lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS, "bias": "none",
        "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}))
    return out


def decode_rate(llm, loras: list, steps: int, seed: int) -> float:
    """Tokens/s of `steps` decode steps over len(loras) rows (row i with adapter loras[i], None: the base)."""
    from deltarun import SamplingParams

    eng = llm.engine
    g = torch.Generator().manual_seed(seed)
    # long enough that the first rows are still decoding when the last prompt is in, and through the timed steps
    params = SamplingParams(temperature=0, max_tokens=steps + 2 * len(loras) + 8, ignore_eos=True).with_defaults({})
    for i, name in enumerate(loras):
        ids = torch.randint(0, 200_000, (32,), generator=g).tolist()
        eng.add_request(f"r{seed}-{i}", ids, params, adapter=name)
    for _ in range(4 * len(loras) + 8):
        if not eng.queue and sum(1 for s in eng.active if s.decoding) == len(loras):
            break
        eng.step()
    else:
        raise RuntimeError("the batch never decoded all rows together")
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    dt = time.perf_counter() - t0
    for i in range(len(loras)):
        eng.abort(f"r{seed}-{i}")
    return steps * len(loras) / dt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the random 0.8B checkpoint (written once)")
    p.add_argument("--quantize", default=None, help="int8 or int4 (default: the bf16 weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--adapters", default="0,1,4", help="distinct adapters in the batch, per configuration")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    from bench_generate import ensure_checkpoint

    from deltarun import LLM

    a.model = ensure_checkpoint(a.model)
    counts = [int(x) for x in a.adapters.split(",")]
    llm = LLM(str(a.model), dtype="bfloat16", device="cpu", quantization=a.quantize, threads=a.threads,
              max_num_seqs=a.batch, max_loras=max(1, *counts), prefix_cache_memory=0, mtp="off")
    root = Path("/tmp/deltarun-bench-lora")
    for i in range(max(counts)):
        folder = write_adapter(llm.model, root / f"r{a.rank}-{i}", a.rank, seed=i)
        llm.engine.adapters.register(f"a{i}", folder)
    rates: dict[int, list[float]] = {n: [] for n in counts}
    decode_rate(llm, [None] * a.batch, 4, seed=999)  # warm-up: kernels, allocations
    for rep in range(a.reps):
        for n in counts:
            loras = [None if n == 0 else f"a{i % n}" for i in range(a.batch)]
            rates[n].append(decode_rate(llm, loras, a.steps, seed=rep * 10 + n))
            print(f"  rep {rep + 1}, {n} adapters: {rates[n][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    base = statistics.median(rates[counts[0]])
    print(f"\n{cpu_label()}; 0.8B shape, {a.quantize or 'bf16'}, batch {a.batch}, rank {a.rank} on every projection, "
          f"{a.threads} threads, medians of {a.reps} interleaved runs\n")
    print("| distinct adapters in the batch | decode tok/s | vs no adapter |\n|---|---|---|")
    for n in counts:
        m = statistics.median(rates[n])
        print(f"| {n} | {m:.1f} | {m / base:.2f}× |")


if __name__ == "__main__":
    main()
