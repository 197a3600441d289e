"""Schemathesis against a live server's own OpenAPI schema (/openapi.json): the harness shared by
tests/test_server_fuzz.py (a bounded run) and benchmarks/fuzz_server.py (the long run).

The fuzzed server is isolated: its HF cache, HF_HOME, deltarun's folder and Ollama's store are empty
temporary folders (a fuzzed DELETE /api/delete can reach no real model), the hub is offline, http media
is off, and it serves one tiny random checkpoint as "tiny" from its own engine (a fuzzed keep_alive 0
unloads that one, not a model other tests share).

Every response is checked (`check`): no 5xx; every error body in its API's shape (/api/*: Ollama's
`{"error": "..."}`, everything else OpenAI's `{"error": {"message", "type", ...}}`); and a body that the
acceptance schema (fuzz_schema.py) calls valid gets a 2xx. Tracebacks and errors in the server's log
(the deltarun, uvicorn and asyncio loggers) are collected by `LogTap`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fuzz_schema import SERVED, acceptance_schema, designed_5xx, excused

LOGGERS = ("deltarun", "uvicorn", "asyncio")  # uvicorn.error ("Exception in ASGI application") propagates to uvicorn


def isolated_env(root: Path) -> dict[str, str]:
    """Environment variables that point every model store at empty folders under `root`, offline."""
    dirs = {k: root / k.lower() for k in ("HF_HOME", "HF_HUB_CACHE", "DELTARUN_HOME", "OLLAMA_MODELS")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    # the fuzz is about the HTTP layer: torch's ops, never a wait for a C++ kernel build (minutes on 2 cores)
    return {**{k: str(v) for k, v in dirs.items()}, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "DELTARUN_CPU_KERNELS": "0"}


class LogTap(logging.Handler):
    """Keeps the server's warnings and errors; `tracebacks` are those carrying an exception."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def tracebacks(self) -> list[str]:
        return [self.format(r) for r in self.records
                if r.exc_info or "Traceback" in r.getMessage() or r.levelno >= logging.ERROR]


@dataclass
class FuzzServer:
    url: str
    log: LogTap
    raw_schema: dict[str, Any]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fuzz_server(ckpt: Path, root: Path) -> Iterator[FuzzServer]:
    """uvicorn in a thread serving `ckpt` as "tiny", with isolated_env(root) set for its lifetime."""
    import uvicorn

    from deltarun.async_llm import AsyncLLM
    from deltarun.ops.settings import reload
    from deltarun.server import create_app

    saved = dict(os.environ)
    os.environ.update(isolated_env(root))
    reload()
    tap = LogTap()
    loggers = [logging.getLogger(n) for n in LOGGERS]
    for lg in loggers:
        lg.addHandler(tap)
    server, thread = None, None
    try:
        llm = AsyncLLM(str(ckpt), dtype="float32", device="cpu")
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(llm, SERVED), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True, name="fuzz server")
        thread.start()
        deadline = time.time() + 60
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("the fuzz server did not start")
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        raw = httpx.get(url + "/openapi.json", timeout=30).json()
        yield FuzzServer(url, tap, raw)
    finally:
        if server is not None and thread is not None:
            server.should_exit = True  # its lifespan closes the engine; a shutdown error is logged to the tap
            thread.join(timeout=30)
        for lg in loggers:
            lg.removeHandler(tap)
        os.environ.clear()
        os.environ.update(saved)
        reload()


@dataclass
class Report:
    """Per route ("POST /api/chat"): status classes of its cases; `failures`: (route, problem, request)."""
    cases: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    excused: Counter = field(default_factory=Counter)

    def table(self, tracebacks: int) -> str:
        rows = ["| route | cases | 2xx | 4xx | 5xx |", "| --- | ---: | ---: | ---: | ---: |"]
        for route in sorted(self.cases):
            c = self.cases[route]
            rows.append(f"| `{route}` | {sum(c.values())} | {c['2xx']} | {c['4xx']} | {c['5xx']} |")
        total = Counter()
        for c in self.cases.values():
            total.update(c)
        rows.append(f"| all | {sum(total.values())} | {total['2xx']} | {total['4xx']} | {total['5xx']} |")
        return "\n".join(rows) + f"\n\ntracebacks in the server log: {tracebacks}; " \
            f"check failures: {len(self.failures)}"


def _anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def _error_shape_ok(path: str, body: Any) -> bool:
    if not isinstance(body, dict) or "error" not in body:
        return False
    if path.startswith("/api/"):  # Ollama
        return set(body) == {"error"} and isinstance(body["error"], str) and bool(body["error"])
    err = body["error"]
    if _anthropic(path):  # {"type": "error", "error": {"type", "message"}}
        return body.get("type") == "error" and isinstance(err, dict) and set(err) == {"type", "message"}
    # OpenAI
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


def _stream_end_ok(path: str, ctype: str, text: str) -> bool:
    """A stream ends as its API ends one: SSE with `data: [DONE]` (OpenAI chat/completions), a
    response.completed / incomplete / failed event (Responses) or a message_stop / error event (Anthropic),
    NDJSON with a last line that is done (chat/generate), a success (pull) or an error in Ollama's shape."""
    if ctype.startswith("text/event-stream") and _anthropic(path):
        last = text.rstrip().rsplit("\n\n", 1)[-1]
        return last.startswith(("event: message_stop", "event: error"))
    if ctype.startswith("text/event-stream") and path.startswith("/v1/responses"):  # no [DONE] in this API
        last = text.rstrip().rsplit("\n\n", 1)[-1]
        return last.startswith(tuple(f"event: response.{e}\n" for e in ("completed", "incomplete", "failed")))
    if ctype.startswith("text/event-stream"):
        return text.rstrip().endswith("data: [DONE]")
    if ctype.startswith("application/x-ndjson"):
        last = _json(text.strip().rsplit("\n", 1)[-1])
        return isinstance(last, dict) and (last.get("done") is True or last.get("status") == "success"
                                           or _error_shape_ok("/api/", last))
    return True


def check(route: str, path: str, positive: bool, status: int, text: str, ctype: str = "") -> str | None:
    """What is wrong with one response, or None."""
    if status >= 500 and not designed_5xx(route, status, text):
        return f"{status}: {text[:300]}"
    if status < 400:
        return None if _stream_end_ok(path, ctype, text) else f"{status} stream cut short: ...{text[-300:]!r}"
    try:
        body = json.loads(text)
    except ValueError:
        return f"{status} with a body that is not JSON: {text[:200]!r}"
    if not _error_shape_ok(path, body):
        return f"{status} error body not in the API's shape: {text[:200]}"
    if positive and not excused(route, status, body):
        return f"a valid request was refused: {status} {text[:300]}"
    return None


def run(url: str, raw_schema: dict[str, Any], *, max_examples: int, seed: int = 0,
        report: Report | None = None, timeout: float = 60.0) -> Report:
    """Positive cases (from the acceptance schema: must succeed) then negative ones (from the served schema:
    must be refused in the API's error shape) for every operation."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    report = report or Report()
    http = httpx.Client(timeout=timeout)
    plans = [(acceptance_schema(raw_schema), GenerationMode.POSITIVE, True),
             (raw_schema, GenerationMode.NEGATIVE, False)]
    for spec, mode, positive in plans:
        schema = schemathesis.openapi.from_dict(spec)
        for result in schema.get_all_operations():
            op = result.ok()
            route = f"{op.method.upper()} {op.path}"
            if not positive and not op.body and not op.path_parameters and not op.query:
                continue  # nothing to make invalid

            @settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False)
            @given(case=op.as_strategy(generation_mode=mode))
            @hypothesis.seed(seed)
            def one(case) -> None:
                kw = case.as_transport_kwargs(base_url=url)
                if kw.get("data") is not None:  # a raw (negative) body
                    kw["content"] = kw.pop("data")
                send = {k: kw[k] for k in ("headers", "params", "json", "content") if kw.get(k) is not None}
                try:
                    r = http.request(kw["method"], kw["url"], **send)
                    status, text, ctype = r.status_code, r.text, r.headers.get("content-type", "")
                except httpx.HTTPError as e:
                    status, text, ctype = 599, f"transport error {e!r}", ""
                report.cases[route][f"{status // 100}xx"] += 1
                if positive and status >= 400 and excused(route, status, _json(text)):
                    report.excused[f"{route} {status}"] += 1
                problem = check(route, case.formatted_path, positive, status, text, ctype)
                if problem:
                    report.failures.append((route, problem, json.dumps(case.body, default=str)
                                            if case.body is not None else case.formatted_path))

            try:
                one()
            except hypothesis.errors.Unsatisfiable:
                pass
    http.close()
    return report


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
