"""Prometheus text-format metrics: request counts, tokens, latency and time-to-first-token histograms.

Kept dependency-free (a few counters in one process); `render()` is what `GET /metrics` returns.
"""
from __future__ import annotations

import threading
from typing import Any

from ..client import EngineStats

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(_BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.total += 1
        self.sum += v
        for i, b in enumerate(_BUCKETS):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(_BUCKETS, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.total}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = {"ok": 0, "aborted": 0}
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.http_errors = 0
        self.latency = _Histogram()
        self.ttft = _Histogram()

    def request_started(self) -> None:
        with self._lock:
            self.running += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def request_finished(self, seconds: float, prompt: int, generated: int, ok: bool) -> None:
        with self._lock:
            self.running -= 1
            self.requests["ok" if ok else "aborted"] += 1
            self.prompt_tokens += prompt
            self.generation_tokens += generated
            self.latency.observe(seconds)

    def error(self) -> None:
        with self._lock:
            self.http_errors += 1

    def render(self, engines: dict[str, EngineStats], models: Any = None) -> str:
        """Prometheus text: the server's counters, then each loaded model's engine counters (label
        `model`; `EngineClient.stats()`); `models`: the ModelManager, for loads/unloads."""
        with self._lock:
            lines = ["# TYPE deltarun_requests_total counter"]
            lines += [f'deltarun_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()]
            lines += ["# TYPE deltarun_http_errors_total counter", f"deltarun_http_errors_total {self.http_errors}",
                      "# TYPE deltarun_prompt_tokens_total counter",
                      f"deltarun_prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE deltarun_generation_tokens_total counter",
                      f"deltarun_generation_tokens_total {self.generation_tokens}",
                      "# TYPE deltarun_requests_running gauge", f"deltarun_requests_running {self.running}"]
            lines += self.latency.lines("deltarun_request_latency_seconds")
            lines += self.ttft.lines("deltarun_time_to_first_token_seconds")
        if models is not None:
            lines += ["# TYPE deltarun_models_loaded gauge", f"deltarun_models_loaded {len(engines)}",
                      "# TYPE deltarun_model_loads_total counter", f"deltarun_model_loads_total {models.loads}",
                      "# TYPE deltarun_model_unloads_total counter", f"deltarun_model_unloads_total {models.unloads}"]
        per_engine = {"requests_waiting": ("gauge", lambda e: e.requests_waiting),
                      "sequences_running": ("gauge", lambda e: e.sequences_running),
                      "prefix_cache_hits_total": ("counter", lambda e: e.prefix_cache_hits),
                      "prefix_cache_hit_tokens_total": ("counter", lambda e: e.prefix_cache_hit_tokens),
                      "prefix_cache_bytes": ("gauge", lambda e: e.prefix_cache_bytes),
                      "prefix_cache_budget_bytes": ("gauge", lambda e: e.prefix_cache_budget),
                      # held by running requests: all 0 when idle, or something leaked
                      "requests_in_engine": ("gauge", lambda e: e.requests_in_engine),
                      "state_slots_used": ("gauge", lambda e: e.state_slots_used),
                      "kv_cache_bytes": ("gauge", lambda e: e.kv_cache_bytes),
                      "preemptions_total": ("counter", lambda e: e.preemptions),
                      "engine_prompt_tokens_total": ("counter", lambda e: e.prompt_tokens),
                      # MTP speculative decoding (engine/speculative.py); 0 when it is off
                      "spec_decode_steps_total": ("counter", lambda e: e.spec_steps),
                      "spec_decode_draft_tokens_total": ("counter", lambda e: e.spec_drafted),
                      "spec_decode_accepted_tokens_total": ("counter", lambda e: e.spec_accepted)}
        for metric, (kind, read) in per_engine.items():
            lines.append(f"# TYPE deltarun_{metric} {kind}")
            lines += [f'deltarun_{metric}{{model="{_label(name)}"}} {read(stats)}' for name, stats in engines.items()]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


METRICS = Metrics()
