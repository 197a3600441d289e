"""Load test (not a test): N concurrent streaming chat clients against a running `deltarun serve`.

    python benchmarks/load_server.py --url http://127.0.0.1:11435 --clients 16 --seconds 120 --max-tokens 64

Prints requests/s, generated tokens/s, p50/p99 time to first token and the number of failed requests.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx


async def client(url: str, model: str, max_tokens: int, until: float, ttfts: list, tokens: list, errors: list):
    async with httpx.AsyncClient(timeout=600) as http:
        i = 0
        while time.perf_counter() < until:
            i += 1
            body = {"model": model, "messages": [{"role": "user", "content": f"Tell me a story, part {i}."}],
                    "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
            start, first = time.perf_counter(), None
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - start
                        if chunk.get("usage"):
                            tokens.append(chunk["usage"]["completion_tokens"])
                ttfts.append(first if first is not None else time.perf_counter() - start)
            except Exception as e:  # a failure to report, not to crash the load run on
                errors.append(repr(e))
                await asyncio.sleep(0.5)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:11435")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    ttfts: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    until = t0 + a.seconds
    await asyncio.gather(*(client(a.url, a.model, a.max_tokens, until, ttfts, tokens, errors)
                           for _ in range(a.clients)))
    wall = time.perf_counter() - t0
    print(f"clients {a.clients}  wall {wall:.1f}s  requests {len(ttfts)}  failed {len(errors)}")
    print(f"requests/s {len(ttfts) / wall:.2f}  tokens/s {sum(tokens) / wall:.1f}")
    if ttfts:
        print(f"TTFT p50 {pct(ttfts, 0.5) * 1000:.0f} ms  p99 {pct(ttfts, 0.99) * 1000:.0f} ms  "
              f"mean {statistics.mean(ttfts) * 1000:.0f} ms")
    for e in errors[:5]:
        print("error:", e)


if __name__ == "__main__":
    asyncio.run(main())
