"""Engine benchmarks (issue 3): batching, chunked-prefill fairness, prefix reuse, long-prompt memory.

Prints Markdown tables for the Qwen3.5-0.8B shape with random weights (speed does not depend on the
values), bf16 on CPU by default:
  1. total decode tokens/s at 1, 2, 4, 8, 16 concurrent sequences;
  2. time to first token of a 4,096-token prompt while 4 other sequences decode (and their decode rate);
  3. second-turn latency of an 8K-token chat with and without prefix reuse;
  4. peak RSS and time while prefilling long prompts (each length in a fresh process).
     `--tail` measures what a whole prefill cannot finish on 2 cores (128K, 262K: hours of quadratic
     attention): the engine prefills the first chunk for real, then the KV caches are filled with random
     values up to the last two chunks (the KV of the whole prompt is reserved at admission as always),
     and the last two chunks run through the real engine at full depth. Memory does not depend on the
     values, so peak RSS is that of the end of the whole prefill; the prefill time is extrapolated from
     the first and last chunk times (a chunk costs a + b·depth: attention is linear in the depth).
     Validated against whole prefills at lengths both can run (see docs/benchmarks.md).
  5. time to first token of a 64-token request arriving while a 32K-token prompt prefills.
  6. closed-loop clients (what a server sees, without HTTP): C clients, each with one 80-token request of 64
     tokens at a time, a finished one replaced at once; generated tok/s over `--seconds` after a warm-up,
     stepping the engine directly and through the async engine's thread (what `deltarun serve` runs).

    .venv/bin/python benchmarks/bench_engine.py                  # all, prefill lengths 8K and 32K
    .venv/bin/python benchmarks/bench_engine.py --parts 4 --lengths 32768,131072,262144 --tail
    .venv/bin/python benchmarks/bench_engine.py --parts 6 --clients 4,16 --seconds 25
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = Path.home() / ".cache" / "deltarun" / "bench-0.8b"


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 240_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(args, **kw):
    from deltarun import LLM

    return LLM(str(args.model), dtype=args.dtype, device="cpu", **kw)


def _params(n: int):
    from deltarun import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True).with_defaults({})


def _run_until(engine, cond) -> None:
    while not cond():
        engine.step()


def part_concurrency(args) -> list[str]:
    rows = ["| concurrent sequences | total decode tok/s | per-sequence tok/s |", "|---|---|---|"]
    llm = _llm(args, prefix_cache_memory=0)
    eng = llm.engine
    for c in args.concurrency:
        for i in range(c):
            eng.add_request(f"c{c}-{i}", _ids(32, seed=i), _params(args.gen_len + 8))
        _run_until(eng, lambda: eng.num_running == c)  # everyone prefilled: time pure decode steps
        for _ in range(2):
            eng.step()
        t, steps = time.perf_counter(), args.gen_len
        for _ in range(steps):
            eng.step()
        dt = time.perf_counter() - t
        _run_until(eng, lambda: not eng.has_unfinished())
        rows.append(f"| {c} | {c * steps / dt:.1f} | {steps / dt:.2f} |")
        print(rows[-1], flush=True)
    return rows


def part_ttft(args) -> list[str]:
    llm = _llm(args, prefix_cache_memory=0)
    eng = llm.engine
    for i in range(4):
        eng.add_request(f"bg{i}", _ids(32, seed=100 + i), _params(100_000))
    _run_until(eng, lambda: eng.num_running == 4)
    eng.add_request("long", _ids(4096, seed=7), _params(1))
    t, bg_tokens = time.perf_counter(), 0
    while "long" in eng.requests:
        outs = eng.step()
        bg_tokens += sum(len(u.new_token_ids) for o in outs if o.request_id != "long" for u in o.updates)
    dt = time.perf_counter() - t
    alone = _llm(args, prefix_cache_memory=0).engine
    alone.add_request("long", _ids(4096, seed=7), _params(1))
    t = time.perf_counter()
    _run_until(alone, lambda: not alone.has_unfinished())
    dt_alone = time.perf_counter() - t
    return ["| workload | time to first token s | background decode tok/s |", "|---|---|---|",
            f"| 4,096-token prompt while 4 sequences decode (chunks of {eng.cfg.max_prefill_tokens}) | {dt:.2f} | "
            f"{bg_tokens / dt:.2f} |",
            f"| the same prompt alone | {dt_alone:.2f} | – |"]


def part_fair(args) -> list[str]:
    """A 64-token request arriving while a long prompt prefills: its time to first token, in seconds and in
    chunk times of the long prompt (median of its chunks just before the arrival)."""
    llm = _llm(args, prefix_cache_memory=0)
    eng = llm.engine
    eng.add_request("long", _ids(args.fair_length, seed=9), _params(1))
    chunks = []
    for _ in range(4):
        t = time.perf_counter()
        eng.step()
        chunks.append(time.perf_counter() - t)
    chunk = sorted(chunks[1:])[1]
    eng.add_request("short", _ids(64, seed=10), _params(1))
    t, steps = time.perf_counter(), 0
    while "short" in eng.requests:
        eng.step()
        steps += 1
    ttft = time.perf_counter() - t
    return ["| workload | short request TTFT s | in chunk times | engine steps | chunk s |", "|---|---|---|---|---|",
            f"| 64-token request during a {args.fair_length:,}-token prefill (chunks of "
            f"{eng.cfg.max_prefill_tokens}) | {ttft:.2f} | {ttft / chunk:.1f} | {steps} | {chunk:.3f} |"]


def part_prefix(args) -> list[str]:
    turn1 = _ids(8192, seed=3)
    rows = ["| second turn of an 8K chat | prompt tokens computed | time to first token s |", "|---|---|---|"]
    for label, budget in (("with prefix reuse", 4 << 30), ("without (cold)", 0)):
        llm = _llm(args, prefix_cache_memory=budget, max_prefill_tokens=2048)
        eng = llm.engine
        answer = llm.generate(turn1, _params(32))[0].outputs[0].token_ids
        turn2 = turn1 + answer + _ids(60, seed=4)
        before = eng.stats["prompt_tokens"]
        t = time.perf_counter()
        llm.generate(turn2, _params(1))
        dt = time.perf_counter() - t
        rows.append(f"| {label} | {eng.stats['prompt_tokens'] - before} | {dt:.2f} |")
        print(rows[-1], flush=True)
    return rows


def prefill_child(args) -> None:
    """Run in a fresh process: prefill one long prompt, report time and peak RSS as JSON."""
    n = args.child
    llm = _llm(args, prefix_cache_memory=0, max_model_len=max(n + 1, 4096), max_prefill_tokens=args.chunk)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    if args.tail:
        dt, first, last = _tail_prefill(llm.engine, n, args.chunk)
    else:
        llm.generate(_ids(n, seed=5), _params(1))
        dt, first, last = time.perf_counter() - t, None, None
    kv = llm.engine.kv_token_bytes * n
    print(json.dumps({"n": n, "s": dt, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_loaded": rss_loaded, "kv": kv, "first_chunk_s": first, "last_chunk_s": last}))


def _fill_kv(seq, start: int, end: int, g: torch.Generator) -> None:
    for kv in seq.state.kv:  # what the skipped chunks would have written (values do not matter)
        for x in (kv.k, kv.v):
            for a in range(start, end, 8192):  # bounded temporaries
                b = min(end, a + 8192)
                x[:, :, a:b] = torch.randn(x[:, :, a:b].shape, generator=g).to(x.dtype)
        kv.length = end


def _tail_prefill(eng, n: int, chunk: int) -> tuple[float, float, float]:
    """The first chunk, then (random KV up to about n − 2·chunk) the last chunks, all in the engine.
    Returns (extrapolated whole-prefill seconds, first chunk s, deepest full chunk s): a token at depth d
    costs α + β·d, fitted to the first chunk and the deepest chunk of the most tokens."""
    eng.add_request("long", _ids(n, seed=5), _params(1))
    seq = eng.queue[0]
    t = time.perf_counter()
    eng.step()  # admits (reserving the KV of all n tokens) and prefills the first chunk
    first = time.perf_counter() - t
    skip = (n - 2 * chunk) // 64 * 64  # a prefix-block boundary, as the engine's own chunks end
    assert seq.num_computed == chunk and skip >= chunk, "--tail needs a prompt of at least 3 chunks"
    with torch.inference_mode():  # the engine made these caches inside inference mode
        _fill_kv(seq, chunk, skip, torch.Generator().manual_seed(0))
    seq.num_computed = seq.state.length = skip
    steps = []  # (tokens, depth of the chunk's middle, seconds)
    while eng.queue:
        before, t = seq.num_computed, time.perf_counter()
        eng.step()
        steps.append((seq.num_computed - before, (before + seq.num_computed) / 2, time.perf_counter() - t))
    tokens, depth, last = max(steps, key=lambda s: (s[0], s[1]))
    alpha0 = first / chunk  # per token at depth ≈ chunk / 2
    beta = (last / tokens - alpha0) / (depth - chunk / 2)
    alpha = alpha0 - beta * chunk / 2
    return n * alpha + beta * n * n / 2, first, last


def part_long(args) -> list[str]:
    est = " (extrapolated)" if args.tail else ""
    rows = [f"| prompt tokens | prefill s{est} | prefill tok/s{est} | peak RSS GB | after load GB | KV held GB "
            "| first / last chunk s |", "|---|---|---|---|---|---|---|"]
    for n in args.lengths:
        cmd = [sys.executable, __file__, "--child", str(n), "--model", str(args.model), "--dtype", args.dtype,
               "--chunk", str(args.chunk), *(["--tail"] if args.tail else [])]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            rows.append(f"| {n} | failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode} |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(f"| {n:,} | {r['s']:.1f} | {n / r['s']:.0f} | {r['rss'] / 1e9:.2f} | "
                    f"{r['rss_loaded'] / 1e9:.2f} | {r['kv'] / 1e9:.2f} | "
                    + (f"{r['first_chunk_s']:.1f} / {r['last_chunk_s']:.1f} |" if args.tail else "– |"))
        print(rows[-1], flush=True)
    return rows


def _closed_loop(eng, clients: int, warmup: float, seconds: float) -> float:
    """Generated tok/s of `clients` closed-loop clients stepping `eng` on this thread."""
    n = 0

    def add() -> None:
        nonlocal n
        eng.add_request(f"q{n}", _ids(80, seed=10_000 + n), _params(64))
        n += 1
    for _ in range(clients):
        add()
    t0, toks = time.perf_counter(), 0
    while (now := time.perf_counter()) < t0 + warmup + seconds:
        outs = eng.step()
        if now > t0 + warmup:
            toks += sum(len(u.new_token_ids) for o in outs for u in o.updates)
        for _ in range(sum(o.finished for o in outs)):
            add()
    for rid in list(eng.requests):
        eng.abort(rid)
    return toks / seconds


def _closed_loop_async(llm, clients: int, warmup: float, seconds: float) -> float:
    """The same through the async engine: the engine steps on its own thread, clients are asyncio tasks."""
    from deltarun.engine.async_engine import AsyncEngine

    engine = AsyncEngine(llm.engine)
    got, n = 0, 0

    async def run() -> None:
        t0 = time.monotonic()

        async def client() -> None:
            nonlocal got, n
            while time.monotonic() < t0 + warmup + seconds:
                n += 1
                async for out in engine.generate(f"a{n}", _ids(80, seed=20_000 + n), _params(64)):
                    if t0 + warmup < time.monotonic() < t0 + warmup + seconds:
                        got += sum(len(u.new_token_ids) for u in out.updates)
        await asyncio.gather(*(client() for _ in range(clients)))
    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    return got / seconds


def part_clients(args) -> list[str]:
    rows = ["| clients | engine stepped here, tok/s | through the async engine, tok/s |", "|---|---|---|"]
    for c in args.clients:
        llm = _llm(args, prefix_cache_memory=0, max_num_seqs=max(c, 1))
        here = _closed_loop(llm.engine, c, args.warmup, args.seconds)
        via = _closed_loop_async(llm, c, args.warmup, args.seconds)
        rows.append(f"| {c} | {here:.1f} | {via:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parts", default="1,2,3,4,5", help="which parts to run (1-6)")
    p.add_argument("--clients", default="4,16", help="closed-loop client counts (part 6)")
    p.add_argument("--warmup", type=float, default=10)
    p.add_argument("--seconds", type=float, default=25, help="measured window of part 6")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--gen-len", type=int, default=32, help="timed decode steps per concurrency level")
    p.add_argument("--lengths", default="8192,32768", help="prompt lengths for the memory part")
    p.add_argument("--fair-length", type=int, default=32768, help="the long prompt of the fairness part")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk for the memory part")
    p.add_argument("--tail", action="store_true", help="memory part: run only the first and last chunks (see top)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.model / "config.json").exists():
        from deltarun.weights.random_init import write_random_checkpoint

        print(f"writing a random 0.8B checkpoint to {args.model} …", flush=True)
        write_random_checkpoint("0.8B", args.model, tokenizer=False)
    if args.child:
        return prefill_child(args)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.clients = [int(c) for c in args.clients.split(",")]
    load = open("/proc/loadavg").read().split()[0]
    print(f"command: {' '.join(sys.argv)}\nmodel: {args.model} ({args.dtype}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {load}\n", flush=True)
    parts = {"1": part_concurrency, "2": part_ttft, "3": part_prefix, "4": part_long, "5": part_fair,
             "6": part_clients}
    tables = [parts[k](args) for k in args.parts.split(",")]
    print()
    for t in tables:
        print("\n".join(t) + "\n")


if __name__ == "__main__":
    main()
