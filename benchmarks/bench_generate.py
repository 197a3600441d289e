"""Prefill / decode throughput and peak memory: deltarun vs transformers, Qwen3.5-0.8B shape, CPU.

Workloads as in llama-bench: ppN = one prefill of N prompt tokens (default 512), tgN = N greedy
decode tokens after a 16-token prompt (default 128). Random weights (the official layout, written
once to a cache folder); the numbers measure speed only. Every (system, rep) runs in a fresh
subprocess so its peak RSS is its own, and reps are interleaved across systems so machine drift hits
all alike. Prints medians as a Markdown table.

    python benchmarks/bench_generate.py                   # full run (pp512, tg128, 3 reps)
    python benchmarks/bench_generate.py --quick           # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

SYSTEMS = ("deltarun-fp32", "deltarun-bf16", "hf-fp32", "hf-bf16")
DEFAULT_MODEL = Path("~/.cache/deltarun/bench-0.8b").expanduser()
TG_PROMPT_LEN = 16  # the short prompt before the decode run
PREFILL_CHUNK = 512
TOKEN_RANGE = 150_000  # prompt ids are drawn from the ordinary (non-special) part of the vocabulary


# ---------------------------------------------------------------- child: one system, one rep
def _prompt(n: int, seed: int):
    import torch
    return torch.randint(0, TOKEN_RANGE, (1, n), generator=torch.Generator().manual_seed(seed))


def _bench_deltarun(folder: str, dtype: str, a) -> dict:
    from deltarun.weights.loader import load_model

    t0 = time.perf_counter()
    model = load_model(folder, dtype=dtype, device="cpu")
    load_s = time.perf_counter() - t0

    def prefill(ids):
        cache = model.new_cache(batch=1)
        for s in range(0, ids.shape[1], PREFILL_CHUNK):
            hidden = model(ids[:, s:s + PREFILL_CHUNK], cache)
        return model.logits(hidden[:, -1]).argmax(-1, keepdim=True), cache

    def decode(tok, cache, n):
        for _ in range(n):
            tok = model.logits(model(tok, cache)[:, -1]).argmax(-1, keepdim=True)

    return _run_workloads(prefill, decode, load_s, a)


def _bench_hf(folder: str, dtype: str, a) -> dict:
    import torch
    import transformers
    from transformers import Qwen3_5ForConditionalGeneration

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t0

    def prefill(ids):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.cache

    def decode(tok, cache, n):
        for _ in range(n):
            out = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
            tok, cache = out.logits[:, -1].argmax(-1, keepdim=True), out.cache

    return _run_workloads(prefill, decode, load_s, a)


def _run_workloads(prefill, decode, load_s: float, a) -> dict:
    import torch
    with torch.inference_mode():
        tok, cache = prefill(_prompt(8, seed=99))  # warm-up: first-call allocations, kernel selection
        decode(tok, cache, 2)
        ids = _prompt(a.prompt_len, seed=0)
        t0 = time.perf_counter()
        prefill(ids)
        pp_s = time.perf_counter() - t0
        tok, cache = prefill(_prompt(TG_PROMPT_LEN, seed=1))
        t0 = time.perf_counter()
        decode(tok, cache, a.gen_len)
        tg_s = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tps": a.prompt_len / pp_s, "decode_tps": a.gen_len / tg_s,
            "rss_gb": _peak_rss_gb()}


def _bench_e2e(folder: str, dtype: str, a) -> float:
    """Decode tok/s through LLM.generate_stream: tokens after the first / time after the first."""
    from deltarun import LLM, SamplingParams
    llm = LLM(folder, dtype=dtype, device="cpu")
    prompt = _prompt(TG_PROMPT_LEN, seed=1)[0].tolist()
    params = SamplingParams(temperature=0, max_tokens=a.gen_len + 1, ignore_eos=True)
    n, t_first = 0, None
    for delta in llm.generate_stream(prompt, params):
        n += len(delta.token_ids)
        if t_first is None:
            t_first, n = time.perf_counter(), 0
    return n / (time.perf_counter() - t_first)


def _peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


def child_main(a) -> None:
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    family, prec = a.child.split("-")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[prec]
    try:
        res = (_bench_deltarun if family == "deltarun" else _bench_hf)(a.model, dtype, a)
    except Exception as e:  # a clean one-line reason for the parent; crashes still show stderr
        print("RESULT " + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    if a.e2e and family == "deltarun":
        import gc
        gc.collect()  # peak RSS was taken above; the LLM loads its own copy of the weights
        try:
            res["e2e_tps"] = _bench_e2e(a.model, dtype, a)
        except Exception as e:  # the LLM class is optional here: report, don't fail the row
            res["e2e_error"] = f"{type(e).__name__}: {e}"
    res["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- parent: orchestration, table
def ensure_checkpoint(model: Path | None) -> Path:
    if model is not None:
        return model
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL
    print(f"writing a random 0.8B checkpoint (~1.7 GB) to {DEFAULT_MODEL} (once) ...", flush=True)
    from deltarun.weights.random_init import write_random_checkpoint
    tmp = DEFAULT_MODEL.with_name(DEFAULT_MODEL.name + ".partial")
    write_random_checkpoint("0.8B", tmp, seed=0, tokenizer=False)
    tmp.rename(DEFAULT_MODEL)
    return DEFAULT_MODEL


def run_child(system: str, a, model: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--model", str(model),
           "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len)]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    cmd += ["--e2e"] if a.e2e else []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    return {"error": f"child exited with status {proc.returncode}:\n{tail}"}


def fmt(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "–"


def print_table(systems: list[str], results: dict[str, list[dict]], e2e: bool) -> None:
    head = ["system", "prefill tok/s", "decode tok/s"] + (["e2e decode tok/s"] if e2e else [])
    head += ["peak RSS GB", "load s"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    med = {}
    for s in systems:
        ok = [r for r in results[s] if "error" not in r]
        med[s] = {k: statistics.median([r[k] for r in ok]) for k in ("prefill_tps", "decode_tps")} if ok else {}
        row = [s, fmt([r["prefill_tps"] for r in ok]), fmt([r["decode_tps"] for r in ok])]
        if e2e:
            row.append(fmt([r["e2e_tps"] for r in ok if "e2e_tps" in r]) if s.startswith("deltarun") else "")
        row += [fmt([r["rss_gb"] for r in ok], 2), fmt([r["load_s"] for r in ok])]
        print("| " + " | ".join(row) + " |")
    for prec in ("fp32", "bf16"):
        d, h = med.get(f"deltarun-{prec}"), med.get(f"hf-{prec}")
        if d and h:
            print(f"\ndeltarun/transformers, {prec}: prefill ×{d['prefill_tps'] / h['prefill_tps']:.2f}, "
                  f"decode ×{d['decode_tps'] / h['decode_tps']:.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help=f"model folder to reuse (default: {DEFAULT_MODEL}, "
                   "written with random weights on first use)")
    p.add_argument("--prompt-len", type=int, help="prefill workload length (default 512; --quick 16)")
    p.add_argument("--gen-len", type=int, help="decode workload length (default 128; --quick 4)")
    p.add_argument("--reps", type=int, help="fresh-process repetitions per system (default 3; --quick 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: all)")
    p.add_argument("--e2e", action="store_true",
                   help="also time decode through deltarun.LLM.generate_stream (deltarun rows)")
    p.add_argument("--quick", action="store_true", help="tiny lengths, one rep: a smoke run")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name, full, quick in (("prompt_len", 512, 16), ("gen_len", 128, 4), ("reps", 3, 1)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be at least 1")
    if a.model is not None and not (a.model / "config.json").is_file():
        p.error(f"--model {a.model}: no config.json there (expected a Qwen3.5 model folder)")
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad or not a.systems:
        p.error(f"--systems: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(SYSTEMS)}")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.child:
        return child_main(a)
    print("command: python " + shlex.join(sys.argv))
    import torch
    import transformers
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"cpu: {cpu} ({os.cpu_count()} logical), threads: {a.threads or torch.get_num_threads()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    load1 = os.getloadavg()[0]
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if load1 > 0.5:
        print(f"WARNING: load average {load1:.2f} > 0.5: something else is running; timings (bf16 above "
              "all) will be far slower and noisy. Run on an idle machine for numbers you report "
              "(on a busy one, --threads 1 suffers least).")
    model = ensure_checkpoint(a.model)
    print(f"model: {model}  workloads: pp{a.prompt_len}, tg{a.gen_len} (after a {TG_PROMPT_LEN}-token "
          f"prompt), reps: {a.reps}\n", flush=True)
    results: dict[str, list[dict]] = {s: [] for s in a.systems}
    for rep in range(1, a.reps + 1):
        for s in a.systems:
            r = run_child(s, a, model)
            results[s].append(r)
            if "error" in r:
                print(f"  rep {rep} {s}: FAILED {r['error']}", flush=True)
                continue
            extra = f" (e2e {r['e2e_tps']:.2f})" if "e2e_tps" in r else ""
            print(f"  rep {rep} {s:14s} prefill {r['prefill_tps']:8.1f} tok/s, decode {r['decode_tps']:6.2f} tok/s"
                  f"{extra}, peak RSS {r['rss_gb']:.2f} GB, load {r['load_s']:.1f} s", flush=True)
            if "e2e_error" in r:
                print(f"    e2e (LLM.generate_stream) failed: {r['e2e_error']}", flush=True)
    print()
    print_table(a.systems, results, a.e2e)


if __name__ == "__main__":
    main()
