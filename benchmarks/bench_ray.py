"""Scale-out benchmark: requests/s and generated tokens/s of plain `deltarun serve` vs `serve --ray` with 1
and 2 engine replicas (each one CPU thread), the same load on each; prints a table with the CPU model.

    python benchmarks/bench_ray.py                          # the tiny test model (made once in ~/.cache/deltarun)
    python benchmarks/bench_ray.py --model ./Qwen3.5-0.8B --requests 32 --max-tokens 64

Each configuration is a `deltarun serve` subprocess on a free loopback port (`--ray` starts its own local Ray
on loopback and stops it on exit). Load: `--requests` chat requests with distinct prompts, `--concurrency` at a
time, through the official openai client, greedy, `--max-tokens` each, after a warm-up of 4. What it shows on
one machine: the overhead of the Ray ingress at one replica, and what a second replica (a second core) adds.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"serve (1 thread)": ["--threads", "1"],
           "serve --ray, 1 replica": ["--ray", "--replicas", "1", "--replica-threads", "1"],
           "serve --ray, 2 replicas": ["--ray", "--replicas", "2", "--replica-threads", "1"]}


def tiny_model() -> Path:
    """The test suite's tiny chat model (real tokenizer and template, random weights), made once."""
    out = Path.home() / ".cache" / "deltarun" / "bench-ray-tiny"
    if not (out / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_checkpoint, tiny_config

        make_checkpoint(out, tiny_config(vocab_size=248320), seed=5, tokenizer=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(model: Path, flags: list[str], args: argparse.Namespace) -> tuple[float, float]:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="bench-ray-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "deltarun", "serve", str(model), "--served-model-name", "m", "--port", str(port),
           "--dtype", args.dtype, "--device", "cpu", "--max-num-seqs", str(args.max_num_seqs), *flags]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, Path(log.name).read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200 and \
                        "deltarun: serving" in Path(log.name).read_text():
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)

        def one(i: int) -> int:
            r = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"{i * 7919}: write about gardens"}],
                max_tokens=args.max_tokens, temperature=0)
            return r.usage.completion_tokens if r.usage else 0

        with cf.ThreadPoolExecutor(args.concurrency) as ex:
            list(ex.map(one, range(10_000, 10_004)))  # warm-up
            start = time.perf_counter()
            tokens = sum(ex.map(one, range(args.requests)))
            wall = time.perf_counter() - start
        return args.requests / wall, tokens / wall
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a model folder with tokenizer files (default: the tiny test model)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", help="comma-separated row numbers to run (1-3)")
    args = p.parse_args()
    model = args.model or tiny_model()
    rows = list(CONFIGS.items())
    if args.only:
        rows = [rows[int(i) - 1] for i in args.only.split(",")]
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; model {model.name}; {args.requests} requests, "
          f"{args.concurrency} at a time, {args.max_tokens} tokens each, greedy")
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average)")
    print("| configuration | requests/s | tokens/s |\n|---|---|---|")
    for name, flags in rows:
        rps, tps = run_config(model, flags, args)
        print(f"| {name} | {rps:.2f} | {tps:.1f} |", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f} (1-min average)")


if __name__ == "__main__":
    main()
