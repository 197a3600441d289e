"""deltarun vs llama.cpp vs transformers on the CPU, same random Qwen3.5-0.8B-shape weights, one table.

Builds (once) the random checkpoint with tokenizer files (`deltarun init-random 0.8B`), converts it
with llama.cpp's own `convert_hf_to_gguf.py` and quantizes it with `llama-quantize` (Q8_0, Q4_0,
Q4_K_M) when a llama.cpp build is given, then runs pp512 / tg128 for every system in fresh processes,
repetitions interleaved, and prints medians with the ratios at matched precision:
deltarun bf16 : llama.cpp BF16, int8 : Q8_0, int4 : Q4_0 and Q4_K_M.

    python benchmarks/bench_cpu.py --llama-cpp /path/to/llama.cpp   # source tree with build/bin/llama-bench
    python benchmarks/bench_cpu.py --systems deltarun-bf16,deltarun-int4 --reps 1

llama.cpp is never part of the repository: build it elsewhere (the PyPI sdist of llama-cpp-python
vendors one: `cmake -B build && cmake --build build --target llama-bench llama-quantize`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = Path("~/.cache/deltarun/bench-0.8b-tok").expanduser()
DELTARUN = {"deltarun-bf16": "bf16", "deltarun-int8": "int8", "deltarun-int4": "int4", "deltarun-int4g32": "int4:32"}
# the same, loaded from folders written once by `deltarun quantize` (what llama.cpp's GGUF files are to it):
# nothing is quantized while loading, so peak RSS is the quantized model's own
SAVED = {"deltarun-int8-saved": "int8", "deltarun-int4-saved": "int4"}
LLAMA = {"llama.cpp-BF16": "bf16", "llama.cpp-Q8_0": "Q8_0", "llama.cpp-Q4_K_M": "Q4_K_M", "llama.cpp-Q4_0": "Q4_0"}
HF = {"transformers-bf16": "hf-bf16"}
PAIRS = [("deltarun-bf16", "llama.cpp-BF16"), ("deltarun-int8", "llama.cpp-Q8_0"),
         ("deltarun-int4", "llama.cpp-Q4_0"), ("deltarun-int4", "llama.cpp-Q4_K_M"),
         ("deltarun-int4g32", "llama.cpp-Q4_0"), ("deltarun-int8-saved", "llama.cpp-Q8_0"),
         ("deltarun-int4-saved", "llama.cpp-Q4_0"), ("deltarun-int4-saved", "llama.cpp-Q4_K_M"),
         ("deltarun-bf16", "transformers-bf16")]


def ensure_model(path: Path) -> Path:
    if (path / "tokenizer.json").is_file():
        return path
    from deltarun.weights.random_init import write_random_checkpoint
    print(f"writing a random 0.8B checkpoint with tokenizer to {path} (once) ...", file=sys.stderr)
    tmp = path.with_name(path.name + ".partial")
    write_random_checkpoint("0.8B", tmp, seed=0, tokenizer=True)
    tmp.rename(path)
    return path


def ensure_gguf(model: Path, llama: Path, quant: str) -> Path:
    out = model / "gguf"
    out.mkdir(exist_ok=True)
    bf16 = out / "model-bf16.gguf"
    if not bf16.exists():
        env = {**os.environ, "PYTHONPATH": str(llama / "gguf-py")}
        subprocess.run([sys.executable, str(llama / "convert_hf_to_gguf.py"), str(model), "--outtype", "bf16",
                        "--outfile", str(bf16)], check=True, env=env, capture_output=True)
    if quant == "bf16":
        return bf16
    path = out / f"model-{quant}.gguf"
    if not path.exists():
        subprocess.run([str(llama / "build/bin/llama-quantize"), str(bf16), str(path), quant], check=True,
                       capture_output=True)
    return path


def ensure_saved(model: Path, quant: str) -> Path:
    out = model / f"quantized-{quant}"
    if not (out / "config.json").is_file():
        print(f"writing {out} (once) ...", file=sys.stderr)
        # in a child: a parent that grew to the model's size would pass its peak RSS on to every later
        # child (Linux keeps ru_maxrss across fork + exec)
        subprocess.run([sys.executable, "-m", "deltarun.cli", "quantize", str(model), str(out),
                        "--bits", quant.removeprefix("int")], check=True, capture_output=True)
    return out


def run_llama(llama: Path, gguf: Path, a) -> dict:
    """One llama-bench run (pp and tg, one repetition); its own peak RSS from wait4."""
    import tempfile
    cmd = [str(llama / "build/bin/llama-bench"), "-m", str(gguf), "-p", str(a.prompt_len), "-n", str(a.gen_len),
           "-t", str(a.threads), "-r", "1", "-o", "json"]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            return {"error": (err.read().strip().splitlines() or ["llama-bench failed"])[-1]}
    res = {"rss_gb": usage.ru_maxrss / 2**20}
    for row in json.loads(out):
        res["prefill_tps" if row.get("n_prompt") else "decode_tps"] = row["avg_ts"]
    return res


def run_deltarun(model: Path, variant: str, a) -> dict:
    from deltarun import bench
    r = bench.run_variant(str(model), variant, [a.prompt_len], a.gen_len, a.threads)
    if "error" in r:
        return r
    return {"prefill_tps": r[f"pp{a.prompt_len}"], "decode_tps": r[f"tg{a.gen_len}"], "rss_gb": r["rss_gb"]}


def run_hf(model: Path, system: str, a) -> dict:
    cmd = [sys.executable, str(HERE / "bench_generate.py"), "--child", system, "--model", str(model),
           "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len), "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--llama-cpp", type=Path, default=os.environ.get("LLAMA_CPP_DIR"),
                   help="llama.cpp source tree with build/bin/llama-bench (default $LLAMA_CPP_DIR; none: skipped)")
    p.add_argument("--systems", default=",".join([*DELTARUN, *SAVED, *LLAMA, *HF]))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=128)
    a = p.parse_args(argv)
    model = ensure_model(a.model.expanduser())
    systems = [s for s in a.systems.split(",") if s]
    if not a.llama_cpp:
        systems = [s for s in systems if s not in LLAMA]
        print("no --llama-cpp / $LLAMA_CPP_DIR: llama.cpp rows skipped", file=sys.stderr)
    ggufs = {s: ensure_gguf(model, a.llama_cpp, LLAMA[s]) for s in systems if s in LLAMA}
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(a.reps):
        for s in systems:
            if s in DELTARUN:
                r = run_deltarun(model, DELTARUN[s], a)
            elif s in SAVED:
                r = run_deltarun(ensure_saved(model, SAVED[s]), "bf16", a)
            elif s in LLAMA:
                r = run_llama(a.llama_cpp, ggufs[s], a)
            else:
                r = run_hf(model, HF[s], a)
            results[s].append(r)
            print(f"  rep {rep + 1} {s}: {r}", file=sys.stderr, flush=True)
    med = {}
    print(f"| system ({a.threads} threads) | pp{a.prompt_len} tok/s | tg{a.gen_len} tok/s | peak RSS GB |")
    print("|---|---|---|---|")
    for s in systems:
        ok = [r for r in results[s] if "error" not in r]
        if not ok:
            print(f"| {s} | {results[s][0].get('error', 'failed')} | | |")
            continue
        med[s] = {k: statistics.median(r[k] for r in ok) for k in ("prefill_tps", "decode_tps", "rss_gb")}
        m = med[s]
        print(f"| {s} | {m['prefill_tps']:.1f} | {m['decode_tps']:.1f} | {m['rss_gb']:.2f} |")
    print("\n| ratio | prefill | decode |\n|---|---|---|")
    for x, y in PAIRS:
        if x in med and y in med:
            print(f"| {x} / {y} | {med[x]['prefill_tps'] / med[y]['prefill_tps']:.2f}× | "
                  f"{med[x]['decode_tps'] / med[y]['decode_tps']:.2f}× |")


if __name__ == "__main__":
    main()
