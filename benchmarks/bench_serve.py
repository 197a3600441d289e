"""Many users at once: `deltarun serve` vs llama.cpp's `llama-server -np N` on /v1/completions, same random
Qwen3.5-0.8B-shape weights (bench_cpu.py's checkpoint and its GGUF conversions).

Each of C clients loops over distinct ~80-token prompts (no prefix-cache ride), 64 greedy tokens each with
`ignore_eos` (random weights would stop anywhere), non-streaming. Throughput is steady-state: a request's
completion tokens are spread evenly over its lifetime and only what falls inside the measuring window (after
`--warmup`) counts. Servers run one at a time on 127.0.0.1, in the order given, repeated `--reps` times
interleaved; the table shows medians of total tok/s and each request's latency p50.

    LLAMA_CPP_DIR=… python benchmarks/bench_serve.py --clients 4,8,16 --systems deltarun-bf16,llama.cpp-BF16
    python benchmarks/bench_serve.py --clients 16 --systems deltarun-int4 --seconds 60
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cpu import DEFAULT_MODEL, LLAMA, ensure_gguf, ensure_model  # noqa: E402

DELTARUN = {"deltarun-bf16": None, "deltarun-int8": "int8", "deltarun-int4": "int4"}
WORDS = ("the river city night light garden window paper music story table winter summer morning voice "
         "stone market letter bridge forest mountain coffee friend station harbor engine planet theory").split()


def prompt(rng: random.Random, n_words: int = 70) -> str:
    return f"Note {rng.randrange(10**9)}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def start(system: str, model: Path, a, port: int, clients: int) -> subprocess.Popen:
    if system in DELTARUN:
        deltarun = Path(sys.executable).with_name("deltarun")
        cmd = [str(deltarun), "serve", str(model), "--port", str(port), "--threads", str(a.threads),
               "--served-model-name", "m", "--max-num-seqs", str(max(clients, 1))]
        if DELTARUN[system]:
            cmd += ["--quantize", DELTARUN[system]]
        cmd += a.deltarun_args.split()
    else:
        gguf = ensure_gguf(model, a.llama_cpp, LLAMA[system])
        cmd = [str(a.llama_cpp / "build/bin/llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port",
               str(port), "-np", str(clients), "-c", str(256 * clients), "-t", str(a.threads), "-a", "m"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    async with httpx.AsyncClient() as c:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if (await c.get(url + "/v1/models", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server not ready in time")


async def load(url: str, clients: int, warmup: float, seconds: float, tokens: int, seed: int) -> dict:
    spans: list[tuple[float, float, int]] = []
    t0 = time.monotonic()
    stop = t0 + warmup + seconds

    async def client(i: int, c: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < stop:
            body = {"model": "m", "prompt": prompt(rng), "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            s = time.monotonic()
            r = await c.post(url + "/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            spans.append((s, time.monotonic(), r.json()["usage"]["completion_tokens"]))

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as c:
        await asyncio.gather(*(client(i, c) for i in range(clients)))
    lo, hi = t0 + warmup, stop
    counted = sum(n * max(0.0, min(e, hi) - max(s, lo)) / (e - s) for s, e, n in spans if e > s)
    lat = [e - s for s, e, _ in spans if s >= lo]
    q = statistics.quantiles(lat, n=10) if len(lat) > 1 else [float("nan")] * 9
    return {"tok_s": counted / (hi - lo), "p50_s": statistics.median(lat) if lat else float("nan"),
            "p90_s": q[8], "max_s": max(lat, default=float("nan")), "requests": len(spans)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--llama-cpp", type=Path, default=os.environ.get("LLAMA_CPP_DIR"))
    p.add_argument("--systems", default="deltarun-bf16,llama.cpp-BF16")
    p.add_argument("--clients", default="16")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--warmup", type=float, default=30)
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, default=18630)
    p.add_argument("--deltarun-args", default="", help="more `deltarun serve` options, e.g. '--mtp off'")
    a = p.parse_args(argv)
    model = ensure_model(a.model.expanduser())
    systems = [s for s in a.systems.split(",") if s and (s in DELTARUN or a.llama_cpp)]
    counts = [int(c) for c in a.clients.split(",")]
    res: dict[tuple[str, int], list[dict]] = {}
    for rep in range(a.reps):
        for n in counts:
            for s in systems:
                proc = start(s, model, a, a.port, n)
                url = f"http://127.0.0.1:{a.port}"
                try:
                    asyncio.run(ready(url, proc))
                    r = asyncio.run(load(url, n, a.warmup, a.seconds, a.tokens, seed=rep))
                except (RuntimeError, httpx.HTTPError) as e:
                    r = {"error": str(e)}
                finally:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                res.setdefault((s, n), []).append(r)
                print(f"  rep {rep + 1} {s} × {n} clients: {r}", file=sys.stderr, flush=True)
    print(f"| system ({a.threads} threads) | clients | total tok/s | request p50 s | p90 s | max s |\n"
          "|---|---|---|---|---|---|")
    for (s, n), runs in res.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(f"| {s} | {n} | {runs[0]['error']} | | | |")
            continue
        print(f"| {s} | {n} | {statistics.median(r['tok_s'] for r in ok):.1f} | "
              + " | ".join(f"{statistics.median(r[k] for r in ok):.1f}" for k in ("p50_s", "p90_s", "max_s")) + " |")
    print("\n| ratio | clients | total tok/s |\n|---|---|---|")
    for n in counts:
        for x, y in (("deltarun-bf16", "llama.cpp-BF16"), ("deltarun-int8", "llama.cpp-Q8_0"),
                     ("deltarun-int4", "llama.cpp-Q4_0")):
            rx = [r["tok_s"] for r in res.get((x, n), []) if "error" not in r]
            ry = [r["tok_s"] for r in res.get((y, n), []) if "error" not in r]
            if rx and ry:
                print(f"| {x} / {y} | {n} | {statistics.median(rx) / statistics.median(ry):.2f}× |")


if __name__ == "__main__":
    main()
