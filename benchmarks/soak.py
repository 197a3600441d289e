"""Soak benchmark: many concurrent streaming clients against one `deltarun serve` for minutes; exits 1 if a goal fails.

    python benchmarks/soak.py ~/.cache/deltarun/bench-0.8b --clients 32 --seconds 600 -- --quantize int8
    python benchmarks/soak.py --url http://127.0.0.1:11435 --model demo --pid 1234 --log serve.log
    python benchmarks/soak.py --url http://127.0.0.1:11435 --model demo --clients 16 --seconds 120 \
        --kinds openai-chat --tokens 64 --image 0 --tools 0 --schema 0 --disconnect 0   # plain chat load

Starts the server (a subprocess on a free port, its log captured to a file) on a checkpoint folder (one
without tokenizer files, like bench-0.8b, is served through a folder of links plus generated tokenizer
files), or attaches to one with --url. The clients (soak_clients.py) mix OpenAI chat + completions and
Ollama chat + generate with images, tools, JSON schemas and intentional mid-stream disconnects.

Goals: 0 failed requests; 0 "Traceback" in the server log; once idle, /metrics shows no request, state slot
or KV byte still held (and the prefix cache within its budget); server RSS at the end ≤ RSS after the
warm-up + 5%. RSS is compared as RssAnon (VmRSS also counts the pages of the memory-mapped weights, which
grow as the embedding rows of new tokens are first read — file cache, not a leak) net of the two caches
that legitimately grow and shrink with the traffic — the KV of requests in flight and the budgeted prefix
cache (both from /metrics at the same moment) — so what remains is what a leak would grow. VmRSS is
reported too. Pass the server's own flags after `--`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_clients import KINDS, Mix, Results, client, warm_up  # noqa: E402

HELD = ("requests_in_engine", "state_slots_used", "kv_cache_bytes", "sequences_running", "requests_waiting")


@dataclass
class Sample:
    t: float  # seconds since the clients started
    rss: int  # bytes (VmRSS): anonymous memory + file pages mapped (the memory-mapped weights count as touched)
    anon: int  # bytes (RssAnon): what the process allocated; what a leak grows
    kv: int  # KV bytes held by requests in flight (/metrics)
    prefix: int  # prefix-cache bytes (/metrics)

    @property
    def net(self) -> int:
        return self.anon - self.kv - self.prefix


@dataclass
class Report:
    clients: int
    seconds: float
    wall: float
    res: Results
    samples: list[Sample] = field(default_factory=list)
    start: Sample | None = None  # after the warm-up
    end: Sample | None = None  # idle, after the clients stopped
    held: dict[str, float] = field(default_factory=dict)  # /metrics gauges once idle (HELD + prefix cache)
    tracebacks: int | None = None  # None: no log to read


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {name: value}, labels dropped (one model is served), values summed over them."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        kb = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
              if k in ("VmRSS", "RssAnon")}
    return kb["VmRSS"], kb["RssAnon"]


async def sample(http: httpx.AsyncClient, url: str, pid: int | None, t: float) -> tuple[Sample | None, dict]:
    m = parse_metrics((await http.get(url + "/metrics")).text)
    s = Sample(t, *rss_bytes(pid), int(m.get("deltarun_kv_cache_bytes", 0)),
               int(m.get("deltarun_prefix_cache_bytes", 0))) if pid else None
    return s, m


async def sampler(url: str, pid: int | None, t0: float, until: float, every: float, out: list[Sample]) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        while (now := time.perf_counter()) < until:
            s, _ = await sample(http, url, pid, now - t0)
            if s is not None:
                out.append(s)
            await asyncio.sleep(min(every, max(0.0, until - time.perf_counter())))


async def wait_idle(url: str, timeout: float) -> dict[str, float]:
    """/metrics once nothing is held any more (aborts are asynchronous), or as it is after `timeout`."""
    deadline = time.perf_counter() + timeout
    async with httpx.AsyncClient(timeout=30) as http:
        while True:
            m = parse_metrics((await http.get(url + "/metrics")).text)
            busy = any(m.get(f"deltarun_{k}", 0) for k in HELD) or m.get("deltarun_requests_running", 0)
            if not busy or time.perf_counter() > deadline:
                return m
            await asyncio.sleep(0.2)


async def run_load(url: str, model: str, clients: int, seconds: float, warmup: float, mix: Mix,
                   pid: int | None, log: Path | None, every: float = 5.0, seed: int = 0) -> Report:
    """The whole soak against a running server: a warm-up round (`warm_up`), then `clients` for `seconds`;
    `warmup`: seconds of that load before the RSS reference is taken."""
    res = Results()
    await warm_up(url, model, mix, res)
    t0 = time.perf_counter()
    until = t0 + seconds
    samples: list[Sample] = []
    await asyncio.gather(sampler(url, pid, t0, until, every, samples),
                         *(client(url, model, mix, until, seed * 1000 + i, res) for i in range(clients)))
    wall = time.perf_counter() - t0
    rep = Report(clients, seconds, wall, res, samples)
    m = await wait_idle(url, timeout=60)
    rep.held = {k: m.get(f"deltarun_{k}", 0.0) for k in (*HELD, "requests_running", "prefix_cache_bytes",
                                                          "prefix_cache_budget_bytes")}
    if pid:
        async with httpx.AsyncClient(timeout=30) as http:
            rep.end, _ = await sample(http, url, pid, wall)
        rep.start = next((s for s in samples if s.t >= warmup), samples[-1] if samples else None)
    if log is not None:
        rep.tracebacks = log.read_text(errors="replace").count("Traceback")
    return rep


def goals(rep: Report, max_growth: float = 0.05) -> list[str]:
    """The goals the run missed (empty: all met)."""
    missed = []
    if rep.res.failures:
        missed.append(f"{len(rep.res.failures)} failed requests")
    if rep.res.ok == 0:
        missed.append("no request completed")
    if rep.tracebacks:
        missed.append(f"{rep.tracebacks} tracebacks in the server log")
    held = {k: v for k, v in rep.held.items() if k in (*HELD, "requests_running") and v}
    if held:
        missed.append(f"still held once idle: {held}")
    if rep.held.get("prefix_cache_bytes", 0) > rep.held.get("prefix_cache_budget_bytes", 0):
        missed.append("the prefix cache is over its budget")
    if rep.start is not None and rep.end is not None and rep.end.net > rep.start.net * (1 + max_growth):
        missed.append(f"anonymous RSS (net of KV and prefix cache) grew {rep.end.net / rep.start.net - 1:+.1%} "
                      f"> {max_growth:.0%} after the warm-up")
    return missed


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def render(rep: Report) -> str:
    r, mb = rep.res, 1 << 20
    lines = [f"clients {rep.clients}  wall {rep.wall:.0f} s  requests {r.requests}  completed {r.ok}  "
             f"disconnected (on purpose) {r.disconnected}  cut at the end {r.cut_at_end}  failed {len(r.failures)}",
             f"completed by kind: {dict(sorted(r.by_kind.items()))}",
             f"tokens generated {r.tokens}  ({r.tokens / rep.wall:.1f}/s, {r.requests / rep.wall:.2f} requests/s)",
             f"TTFT p50 {pct(r.ttft, .5) * 1e3:.0f} ms  p99 {pct(r.ttft, .99) * 1e3:.0f} ms;  "
             f"inter-token p50 {pct(r.itl, .5) * 1e3:.0f} ms  p99 {pct(r.itl, .99) * 1e3:.0f} ms"]
    if rep.start and rep.end:
        a, b = rep.start, rep.end
        peak = max(s.rss for s in rep.samples) if rep.samples else b.rss
        lines.append(f"RSS after warm-up (t={a.t:.0f} s) {a.rss / mb:.0f} MiB, end (idle) {b.rss / mb:.0f} MiB "
                     f"({b.rss / a.rss - 1:+.1%}), peak {peak / mb:.0f} MiB; anonymous {a.anon / mb:.0f} → "
                     f"{b.anon / mb:.0f} MiB, net of KV + prefix cache {a.net / mb:.0f} → {b.net / mb:.0f} MiB "
                     f"({b.net / a.net - 1:+.1%})")
        step = max(1, len(rep.samples) // 10)
        lines.append("timeline (s: RSS / anonymous / net MiB): " + ", ".join(
            f"{s.t:.0f}: {s.rss / mb:.0f}/{s.anon / mb:.0f}/{s.net / mb:.0f}" for s in [*rep.samples[::step], b]))
    lines.append("held once idle: " + ", ".join(f"{k} {v:.0f}" for k, v in rep.held.items()))
    lines.append(f"tracebacks in the server log: {'n/a' if rep.tracebacks is None else rep.tracebacks}")
    lines += [f"failure: {f}" for f in r.failures[:10]]
    return "\n".join(lines)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_ready(model: Path, work: Path) -> Path:
    """`model`, or (when it has no tokenizer files) a folder of links to it plus generated tokenizer files."""
    if (model / "tokenizer.json").exists():
        return model
    from deltarun.config import ModelConfig
    from deltarun.processor.tokenizer_files import write_tokenizer_files
    from deltarun.weights.random_init import _thinking_default

    out = work / model.name
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    write_tokenizer_files(out, thinking_default=_thinking_default(ModelConfig.from_file(model / "config.json")))
    return out


def start_server(model: Path, name: str, log: Path, args: list[str],
                 timeout: float = 900) -> tuple[subprocess.Popen, str]:
    """`deltarun serve` on a free loopback port, its output to `log`; returns once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "deltarun", "serve", str(model), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM (the server drains), then SIGKILL if it is still there after `timeout`; its exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", help="checkpoint folder to serve (omit with --url)")
    ap.add_argument("--url", help="attach to this running server instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, for RSS")
    ap.add_argument("--log", type=Path, help="with --url: the server's log, for tracebacks; else where to write it")
    ap.add_argument("--model", default="soak", help="model name the clients send (default soak; the name it is "
                    "served under when the benchmark starts the server)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--warmup", type=float, help="seconds before the RSS reference (default 10%% of --seconds)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated request kinds")
    ap.add_argument("--tokens", default="64-256", help="answer length range (max_tokens / num_predict)")
    for f, d in (("image", .15), ("tools", .15), ("schema", .15), ("disconnect", .10)):
        ap.add_argument(f"--{f}", type=float, default=d, help=f"fraction of requests with {f} (default {d})")
    ap.add_argument("--grace", type=float, help="cut requests still under way this many seconds after the end "
                    "(counted apart, not failures; default: let them finish)")
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    a = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    lo, _, hi = a.tokens.partition("-")
    mix = Mix(tuple(a.kinds.split(",")), a.image, a.tools, a.schema, a.disconnect, int(lo), int(hi or lo), a.grace)
    warmup = a.warmup if a.warmup is not None else a.seconds / 10
    proc, code = None, 0
    if a.url:
        url, pid, log = a.url.rstrip("/"), a.pid, a.log
    elif not a.checkpoint:
        ap.error("give a model folder or --url")
    else:
        work = Path(tempfile.mkdtemp(prefix="deltarun-soak-"))  # kept: the log is worth reading after a failure
        log = a.log or work / "server.log"
        proc, url = start_server(chat_ready(Path(a.checkpoint).expanduser(), work), a.model, log, server_args)
        pid = proc.pid
        print(f"server pid {pid} on {url}, log {log}: deltarun serve {a.checkpoint} {' '.join(server_args)}",
              flush=True)
    try:
        rep = asyncio.run(run_load(url, a.model, a.clients, a.seconds, warmup, mix, pid, log))
    finally:
        if proc is not None:
            code = stop_server(proc)
    if proc is not None and log is not None:  # the drain and shutdown may log too
        rep.tracebacks = log.read_text(errors="replace").count("Traceback")
    print(render(rep))
    missed = goals(rep, a.max_rss_growth) + ([f"the server exited with {code} after SIGTERM"] if code else [])
    print("goals: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
