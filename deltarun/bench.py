"""`deltarun bench MODEL`: prefill and decode speed, peak memory and load time, per dtype/quantization.

Workloads as in llama-bench: ppN = one prefill of N prompt tokens (in the engine's 512-token chunks),
tgN = N greedy decode tokens after a 16-token prompt, straight through the model (no HTTP, no
scheduler), so the numbers compare machines and precisions. Each variant runs in a fresh process
(`python -m deltarun.bench --child …`) so its peak RSS is its own; repetitions are interleaved across
variants so machine drift hits all alike, and the table shows medians. Memory is read from the child's
/proc/self/status: baseline (torch and deltarun imported), after the load, and the peak (VmHWM: this
process's own high-water mark, which a parent's size cannot leak into as it can into ru_maxrss). Under the
table, each variant's paths: the kernel level and which route each linear took (ops/routes.py), and how many
decoder layers ran their decode step as one fused op (ops/layer.py).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

CHUNK = 512
DEEP = 2048  # a long prompt's last tokens, timed apart (`pp<N>_deep`)
TG_PROMPT = 16
TOKEN_RANGE = 150_000  # prompt ids from the ordinary part of the vocabulary (or all of a smaller one)


def _prompt(n: int, seed: int, vocab: int = TOKEN_RANGE):
    import torch
    return torch.randint(0, min(TOKEN_RANGE, vocab), (1, n), generator=torch.Generator().manual_seed(seed))


def memory_gb() -> dict[str, float]:
    """This process's resident and peak resident memory (GB, 2**30) from /proc/self/status; ru_maxrss elsewhere."""
    try:
        fields = dict(ln.split(":", 1) for ln in open("/proc/self/status") if ln.startswith(("VmRSS", "VmHWM")))
        return {k: int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM")}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        return {"VmRSS": peak, "VmHWM": peak}


def paths(model) -> dict[str, object]:
    """What ran: the kernel level, each (phase, route) with its count of linears, fused decoder layers, and the
    attention of bf16 prompt chunks (ops/attention.py: fp32 models always take torch's)."""
    from .ops import kernels, layer, routes

    built = kernels.available()
    level = (kernels.cpu_level() or "native") if built else "none (torch's ops)"
    fused = sum(1 for m in model.modules() if m.__dict__.get("_decode_plan") not in (None, layer._NO))
    decoder = sum(1 for m in model.modules() if hasattr(m, "fused_parts"))
    return {"kernels": level, "native_bf16": kernels.native_bf16_matmul(),
            "routes": {f"{ph}:{r}": n for (ph, r), n in sorted(routes.describe(model).items())},
            "fused_layers": f"{fused}/{decoder}",
            "prefill_attention": "attn_bf16 (bf16)" if kernels.has_attn() else "torch flash"}


def measure(folder: str, dtype: str, quantization: str | None, prompt_lens: list[int], gen_len: int,
            threads: int | None = None) -> dict:
    """Run the workloads in this process: {"load_s", "pp<N>" tok/s…, "pp<N>_deep" (the last DEEP tokens' rate, for
    N ≥ 2·DEEP), "tg<N>" tok/s (gen_len > 0), "base_gb",
    "load_gb", "rss_gb" (peak), "threads", "paths"}."""
    import torch

    from .threads import set_threads
    from .weights.loader import load_model

    set_threads(threads)
    base = memory_gb()["VmRSS"]
    t0 = time.perf_counter()
    model = load_model(folder, dtype=dtype, device="cpu", quantization=quantization)
    res: dict = {"load_s": time.perf_counter() - t0, "base_gb": base, "load_gb": memory_gb()["VmRSS"]}
    vocab = model.config.text.vocab_size

    def prefill(ids, times: list[tuple[int, float]] | None = None):
        cache = model.new_cache(batch=1)
        for s in range(0, ids.shape[1], CHUNK):
            t = time.perf_counter()
            hidden = model(ids[:, s:s + CHUNK], cache)
            if times is not None:
                times.append((min(CHUNK, ids.shape[1] - s), time.perf_counter() - t))
        return model.logits(hidden[:, -1]).argmax(-1, keepdim=True), cache

    with torch.inference_mode():
        tok, cache = prefill(_prompt(8, seed=99, vocab=vocab))  # warm-up: first-call allocations, kernel selection
        for _ in range(2):
            tok = model.logits(model(tok, cache)[:, -1]).argmax(-1, keepdim=True)
        for n in prompt_lens:
            times: list[tuple[int, float]] = []
            t0 = time.perf_counter()
            prefill(_prompt(n, seed=n, vocab=vocab), times)
            res[f"pp{n}"] = n / (time.perf_counter() - t0)
            if n >= 2 * DEEP:  # the rate of the prompt's deepest chunks, ≥ DEEP tokens (attention over most keys)
                tokens = seconds = 0.0
                for size, dt in reversed(times):
                    if tokens >= DEEP:
                        break
                    tokens, seconds = tokens + size, seconds + dt
                res[f"pp{n}_deep"] = tokens / seconds
        if gen_len:
            tok, cache = prefill(_prompt(TG_PROMPT, seed=1, vocab=vocab))
            t0 = time.perf_counter()
            for _ in range(gen_len):
                tok = model.logits(model(tok, cache)[:, -1]).argmax(-1, keepdim=True)
            res[f"tg{gen_len}"] = gen_len / (time.perf_counter() - t0)
    res["rss_gb"] = memory_gb()["VmHWM"]
    res["threads"] = torch.get_num_threads()
    res["paths"] = paths(model)
    return res


def run_variant(folder: str, variant: str, prompt_lens: list[int], gen_len: int, threads: int | None) -> dict:
    """One variant ("bf16", "fp32", "int8", "int4", "int4:32") in a fresh process."""
    spec = json.dumps({"folder": folder, "variant": variant, "prompt_lens": prompt_lens, "gen_len": gen_len,
                       "threads": threads})
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "deltarun.bench", "--child", spec],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0]}"}


def split_variant(variant: str) -> tuple[str, str | None]:
    """"int4" → (bf16, int4); "fp32" → (fp32, None); "fp32+int8" → (fp32, int8)."""
    dtype, _, quant = variant.partition("+")
    if dtype.startswith("int"):
        return "bfloat16", dtype
    return {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype), quant or None


def bench(folder: str, variants: list[str], prompt_lens: list[int], gen_len: int, reps: int,
          threads: int | None, log=print) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(reps):
        for v in variants:
            r = run_variant(folder, v, prompt_lens, gen_len, threads)
            results[v].append(r)
            log(f"  rep {rep + 1}/{reps} {v}: " + (r["error"] if "error" in r else
                ", ".join(f"{k} {val:.2f}" for k, val in r.items() if isinstance(val, float))))
    return results


def table(results: dict[str, list[dict]], prompt_lens: list[int], gen_len: int) -> str:
    deep = [f"pp{n}_deep" for n in prompt_lens if any(f"pp{n}_deep" in r for runs in results.values() for r in runs)]
    cols = [f"pp{n}" for n in prompt_lens] + deep + ([f"tg{gen_len}"] if gen_len else [])
    names = [c.replace("_deep", f" last {DEEP}") for c in cols]
    head = ["variant"] + [f"{c} tok/s" for c in names] + ["base / loaded / peak RSS GB", "load s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append(f"| {v} | " + (runs[0]["error"] if runs else "no run") + " |")
            continue

        def med(key: str, digits: int = 1) -> str:
            return f"{statistics.median(r[key] for r in ok):.{digits}f}"
        rss = " / ".join(med(k, 2) for k in ("base_gb", "load_gb", "rss_gb"))
        lines.append("| " + " | ".join([v] + [med(c) for c in cols] + [rss, med("load_s")]) + " |")
    return "\n".join(lines)


def describe_paths(results: dict[str, list[dict]]) -> str:
    """One line per variant: the kernel level, the routes its linears took and the fused decoder layers."""
    out = []
    for v, runs in results.items():
        p = next((r["paths"] for r in runs if "paths" in r), None)
        if p is None:
            continue
        routes = ", ".join(f"{k} ×{n}" for k, n in p["routes"].items())
        out.append(f"{v}: kernels {p['kernels']}{' (hardware bf16)' if p['native_bf16'] else ''}; "
                   f"fused decode layers {p['fused_layers']}; prefill attention {p.get('prefill_attention', '?')}; "
                   f"routes {routes or 'none'}")
    return "\n".join(out)


def _child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    dtype, quant = split_variant(spec["variant"])
    try:
        res = measure(spec["folder"], dtype, quant, spec["prompt_lens"], spec["gen_len"], spec["threads"])
    except Exception as e:  # one clean line for the parent
        res = {"error": f"{type(e).__name__}: {e}"}
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        sys.exit("usage: deltarun bench MODEL (this module's --child mode is internal)")
