"""deltarun vs llama.cpp vs transformers on the CPU, same random Qwen3.5-0.8B-shape weights, one table.

Builds (once) the random checkpoint with tokenizer files (`deltarun init-random 0.8B`), converts it
with llama.cpp's own `convert_hf_to_gguf.py` and quantizes it with `llama-quantize` (Q8_0, Q4_0,
Q4_K_M) when a llama.cpp build is given, then runs pp512 / tg128 for every system in fresh processes,
repetitions interleaved, and prints medians with the ratios at matched precision:
deltarun bf16 : llama.cpp BF16, int8 : Q8_0, int4 : Q4_0 and Q4_K_M. Optional passes, each interleaved:
`--long 8192` (one prefill of that many tokens per system, `--long-reps`), `--cold` (wall time of a whole
process that loads the model and writes 8 tokens for "Hello": `deltarun generate` from the folder, a saved
quantized folder or the GGUF file, against llama.cpp's `llama-simple` on the same GGUF) and `--bandwidth`
(deltarun's decode as a fraction of bandwidth / bytes read per token, `x.sum()` over 1 GiB read between runs).

Memory: deltarun's children report their own baseline (torch + deltarun imported), after-load and peak
(VmHWM) RSS; external programs run under a small launcher that forks them and reads wait4's ru_maxrss, so
a large parent's high-water mark (which Linux carries across fork and exec) never counts as theirs.

    python benchmarks/bench_cpu.py --llama-cpp /path/to/llama.cpp   # source tree with build/bin/llama-bench
    python benchmarks/bench_cpu.py --systems deltarun-bf16,deltarun-int4 --reps 1
    python benchmarks/bench_cpu.py --systems deltarun-bf16,llama.cpp-BF16 --long 8192 --cold --bandwidth

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

from deltarun import bench

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = Path("~/.cache/deltarun/bench-0.8b-tok").expanduser()
DELTARUN = {"deltarun-bf16": "bf16", "deltarun-int8": "int8", "deltarun-int4": "int4", "deltarun-int4g32": "int4:32"}
# the same, loaded from folders written once by `deltarun quantize` (what llama.cpp's GGUF files are to it):
# nothing is quantized while loading, so peak RSS is the quantized model's own
SAVED = {"deltarun-int8-saved": "int8", "deltarun-int4-saved": "int4"}
LLAMA = {"llama.cpp-BF16": "bf16", "llama.cpp-Q8_0": "Q8_0", "llama.cpp-Q4_K_M": "Q4_K_M", "llama.cpp-Q4_0": "Q4_0"}
HF = {"transformers-bf16": "hf-bf16"}
# cold start: what each system's `generate` loads (deltarun also straight from llama.cpp's GGUF files)
COLD_GGUF = {"deltarun-gguf-Q8_0": "Q8_0", "deltarun-gguf-Q4_0": "Q4_0", "deltarun-gguf-Q4_K_M": "Q4_K_M"}
COLD_PAIRS = [("deltarun-bf16", "llama.cpp-BF16"), ("deltarun-int8-saved", "llama.cpp-Q8_0"),
              ("deltarun-int4-saved", "llama.cpp-Q4_0"), ("deltarun-gguf-Q8_0", "llama.cpp-Q8_0"),
              ("deltarun-gguf-Q4_0", "llama.cpp-Q4_0"), ("deltarun-gguf-Q4_K_M", "llama.cpp-Q4_K_M")]
# forks the command from a small process and reports its wait4 usage and wall time on stderr's last line
LAUNCHER = ("import json, os, sys, time\n"
            "t = time.perf_counter(); pid = os.fork()\n"
            "if pid == 0:\n    os.execvp(sys.argv[1], sys.argv[1:])\n"
            "_, st, ru = os.wait4(pid, 0)\n"
            "print('\\nLAUNCH ' + json.dumps({'rc': os.waitstatus_to_exitcode(st), 'rss_gb': ru.ru_maxrss / 2**20,"
            " 'wall_s': time.perf_counter() - t}), file=sys.stderr)\n")
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


def launch(cmd: list[str], env: dict | None = None) -> tuple[dict, str, str]:
    """Run `cmd` under LAUNCHER: ({"rc", "rss_gb", "wall_s"}, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True, env=env)
    lines = proc.stderr.rstrip().splitlines()
    if not lines or not lines[-1].startswith("LAUNCH "):  # the launcher itself failed: never a 0 s success
        return {"rc": proc.returncode or 1, "rss_gb": 0.0, "wall_s": 0.0}, proc.stdout, proc.stderr
    return json.loads(lines[-1][7:]), proc.stdout, "\n".join(lines[:-1])


def run_llama(llama: Path, gguf: Path, a, prompt_lens: list[int], gen_len: int, depth: int = 0) -> dict:
    """One llama-bench run (pp and tg, one repetition) and its own peak RSS. With `depth`, the prompt's
    tokens come after that many in the context: reported as pp<depth + N>_deep (deltarun.bench's key)."""
    cmd = [str(llama / "build/bin/llama-bench"), "-m", str(gguf), "-p", ",".join(map(str, prompt_lens)),
           "-n", str(gen_len), "-t", str(a.threads), "-r", "1", "-o", "json", *(["-d", str(depth)] if depth else [])]
    info, out, err = launch(cmd)
    if info["rc"] != 0:
        return {"error": (err.strip().splitlines() or ["llama-bench failed"])[-1]}
    res = {"rss_gb": info["rss_gb"]}
    for row in json.loads(out):
        n = row.get("n_prompt")
        res[(f"pp{depth + n}_deep" if depth else f"pp{n}") if n else f"tg{row['n_gen']}"] = row["avg_ts"]
    return res


def run_deltarun(model: Path, variant: str, a, prompt_lens: list[int], gen_len: int) -> dict:
    return bench.run_variant(str(model), variant, prompt_lens, gen_len, a.threads)


def run_hf(model: Path, system: str, a) -> dict:
    cmd = [sys.executable, str(HERE / "bench_generate.py"), "--child", system, "--model", str(model),
           "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len), "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            return {f"pp{a.prompt_len}": r["prefill_tps"], f"tg{a.gen_len}": r["decode_tps"], "rss_gb": r["rss_gb"]}
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}


def cold_command(system: str, model: Path, a) -> list[str] | None:
    """The whole-process command a user runs first, for `system`: load, then 8 tokens for "Hello"."""
    deltarun = Path(sys.executable).with_name("deltarun")
    gen = [str(deltarun) if deltarun.exists() else "deltarun", "generate"]
    tail = ["Hello", "--max-tokens", "8", "--raw", "--threads", str(a.threads)]
    if system in DELTARUN and DELTARUN[system] == "bf16":
        return [*gen, str(model), *tail]
    if system in SAVED:
        return [*gen, str(ensure_saved(model, SAVED[system])), *tail]
    if system in COLD_GGUF and a.llama_cpp:
        return [*gen, str(ensure_gguf(model, a.llama_cpp, COLD_GGUF[system])), *tail]
    if system in LLAMA:
        return [str(a.llama_cpp / "build/bin/llama-simple"), "-m", str(ensure_gguf(model, a.llama_cpp, LLAMA[system])),
                "-n", "8", "Hello"]
    return None


def read_bandwidth(threads: int) -> float:
    """GB/s of `x.sum()` over 1 GiB of fp32 (bench_bandwidth.py), in a child so this process stays small."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench_bandwidth import read_bandwidth; "
            "print(read_bandwidth(int(sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, str(HERE), str(threads)], capture_output=True, text=True,
                         check=True).stdout
    return float(out.split()[-1]) / 1e9


def decode_gb(model: Path, system: str) -> float | None:
    """GB a decode token reads (weights + DeltaNet state) for a deltarun system, from a child that loads it."""
    if system in DELTARUN:
        folder, variant = model, DELTARUN[system]
    elif system in SAVED:
        folder, variant = ensure_saved(model, SAVED[system]), "bf16"
    else:
        return None
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from bench_bandwidth import decode_bytes; print(sum(decode_bytes(Path(sys.argv[2]), sys.argv[3])))")
    out = subprocess.run([sys.executable, "-c", code, str(HERE), str(folder), variant], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[-1]) / 1e9


def med(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


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
    p.add_argument("--long", type=int, default=0, help="also one prefill of this many tokens per system (e.g. 8192)")
    p.add_argument("--long-reps", type=int, default=1)
    p.add_argument("--cold", action="store_true", help="also cold start: load + 8 tokens, whole process")
    p.add_argument("--cold-reps", type=int, default=3)
    p.add_argument("--bandwidth", action="store_true", help="also deltarun decode as a fraction of the bandwidth limit")
    a = p.parse_args(argv)
    model = ensure_model(a.model.expanduser())
    systems = [s for s in a.systems.split(",") if s]
    if not a.llama_cpp:
        systems = [s for s in systems if s not in LLAMA and s not in COLD_GGUF]
        print("no --llama-cpp / $LLAMA_CPP_DIR: llama.cpp rows skipped", file=sys.stderr)
    speed = [s for s in systems if s not in COLD_GGUF]
    for s in systems:  # conversions, saved folders and the kernel build happen before anything is timed
        if s in LLAMA or s in COLD_GGUF:
            ensure_gguf(model, a.llama_cpp, {**LLAMA, **COLD_GGUF}[s])
        if s in SAVED:
            ensure_saved(model, SAVED[s])
    pp, tg, long, deep = f"pp{a.prompt_len}", f"tg{a.gen_len}", f"pp{a.long}", f"pp{a.long}_deep"
    results: dict[str, list[dict]] = {s: [] for s in systems}
    bw: list[float] = []

    def one(s: str, lens: list[int], gen: int) -> dict:
        if s in DELTARUN:
            return run_deltarun(model, DELTARUN[s], a, lens, gen)
        if s in SAVED:
            return run_deltarun(ensure_saved(model, SAVED[s]), "bf16", a, lens, gen)
        if s in LLAMA:
            return run_llama(a.llama_cpp, ensure_gguf(model, a.llama_cpp, LLAMA[s]), a, lens, gen)
        return run_hf(model, HF[s], a) if gen else {}

    for rep in range(a.reps):
        for s in speed:
            if a.bandwidth:
                bw.append(read_bandwidth(a.threads))
            r = one(s, [a.prompt_len], a.gen_len)
            results[s].append(r)
            print(f"  rep {rep + 1} {s}: {json.dumps({k: v for k, v in r.items() if k != 'paths'})}",
                  file=sys.stderr, flush=True)
    for rep in range(a.long_reps if a.long else 0):
        for s in speed:
            r = one(s, [a.long], 0)
            if s in LLAMA and a.long >= 2 * bench.DEEP:  # its deepest tokens: llama-bench's own depth option
                gguf = ensure_gguf(model, a.llama_cpp, LLAMA[s])
                r.update(run_llama(a.llama_cpp, gguf, a, [bench.DEEP], 0, depth=a.long - bench.DEEP))
            results[s].append({k: r[k] for k in (long, deep) if k in r})
            print(f"  {long} rep {rep + 1} {s}: {r.get(long, r.get('error'))} (deepest {bench.DEEP}: {r.get(deep)})",
                  file=sys.stderr, flush=True)
    # as an installed package runs: compiled bytecode kept (a dev shell's PYTHONDONTWRITEBYTECODE would make every
    # start compile deltarun's sources again), and one untimed start first (byte code, page cache)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    for s in systems if a.cold else ():
        if cmd := cold_command(s, model, a):
            launch(cmd, env)
    for rep in range(a.cold_reps if a.cold else 0):
        for s in systems:
            cmd = cold_command(s, model, a)
            if cmd is None:
                continue
            info, _, err = launch(cmd, env)
            results[s].append({"cold_s": info["wall_s"], "cold_rss_gb": info["rss_gb"]} if info["rc"] == 0 else
                              {"error": (err.strip().splitlines() or ["failed"])[-1]})
            print(f"  cold rep {rep + 1} {s}: {results[s][-1]}", file=sys.stderr, flush=True)
    gbs = statistics.median(bw) if bw else None
    if gbs:
        print(f"read bandwidth: x.sum() over 1 GiB, {a.threads} threads, median of {len(bw)}: {gbs:.1f} GB/s\n")
    cols = [pp, *([long, deep] if a.long else []), tg]
    names = [c.replace("_deep", f" last {bench.DEEP}") for c in cols]
    print(f"| system ({a.threads} threads) | " + " | ".join(f"{c} tok/s" for c in names)
          + " | of bandwidth limit | base / loaded / peak RSS GB | cold start s (its peak RSS GB) |")
    print("|---|" + "---|" * (len(cols) + 3))
    meds = {s: {k: med(results[s], k) for k in [*cols, "rss_gb", "base_gb", "load_gb", "cold_s", "cold_rss_gb"]}
            for s in systems}
    for s in systems:
        m = meds[s]
        if all(v is None for v in m.values()):
            err = next((r["error"] for r in results[s] if "error" in r), "no run")
            print(f"| {s} | {err} |" + " |" * (len(cols) + 2))
            continue
        frac = "–"
        if gbs and m[tg] and (nbytes := decode_gb(model, s)):
            frac = f"{m[tg] / (gbs / nbytes):.0%} of {gbs / nbytes:.1f}"
        keys = ("base_gb", "load_gb", "rss_gb") if m["base_gb"] else ("rss_gb",)
        rss = " / ".join(fmt(m[k], 2) for k in keys)
        cold = f"{m['cold_s']:.2f} ({m['cold_rss_gb']:.2f})" if m["cold_s"] else "–"
        print(f"| {s} | " + " | ".join(fmt(m[c]) for c in cols) + f" | {frac} | {rss} | {cold} |")
    print("\n| ratio | " + " | ".join(f"{c}" for c in cols) + " | peak RSS |\n|---|" + "---|" * (len(cols) + 1))
    for x, y in PAIRS:
        if x in meds and y in meds and meds[x][tg] and meds[y][tg]:
            r = [fmt(meds[x][c] / meds[y][c], 2) + "×" if meds[x][c] and meds[y][c] else "–"
                 for c in [*cols, "rss_gb"]]
            print(f"| {x} / {y} | " + " | ".join(r) + " |")
    if a.cold:
        print("\n| cold start | wall | ratio |\n|---|---|---|")
        for x, y in COLD_PAIRS:
            if x in meds and y in meds and meds[x]["cold_s"] and meds[y]["cold_s"]:
                print(f"| {x} / {y} | {meds[x]['cold_s']:.2f} s / {meds[y]['cold_s']:.2f} s | "
                      f"{meds[x]['cold_s'] / meds[y]['cold_s']:.2f}× |")
    if lines := bench.describe_paths({s: results[s] for s in speed}):
        print("\npaths that ran:\n" + lines)


if __name__ == "__main__":
    main()
