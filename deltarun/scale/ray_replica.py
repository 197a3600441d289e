"""`EngineReplica`: one Ray Serve replica owning one engine (`AsyncLLM` with its own CPU threads or a GPU).

It serves the engine half of the `EngineClient` seam (client.py) to the ingress (ray_client.py): prepared
requests in (token ids, SamplingParams, media, adapter), `StepOutput`s out, streamed through Serve; the
tokenizer, templates and detokenizing stay in the ingress. Each stream opens with a `ReplicaInfo` (who
answers) and closes with an `EngineReport` (its engine's counters then): the ingress never calls one given
replica by itself, which Serve's handles do not offer (a router that pins calls to a replica jammed Serve's
routing queue when tried). Besides `generate` it answers `describe` (what the ingress needs to prepare
requests as the engine would) and Serve's `check_health`: an engine thread that died, or that has work but
has not stepped for `wedged_after` seconds, fails the check and Serve replaces the replica. Per-replica
counters go to Ray's metrics (`ray.serve.metrics`, tagged with the replica by Serve).
"""
from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from ..client import EngineStats, ModelInfo
from ..inputs import MultiModalInput, StepOutput
from ..sampling import SamplingParams
from .loopback import bind_grpc_to_node


@dataclass(frozen=True)
class ReplicaInfo:
    """Who answers: sent first on every stream (the ingress counts per replica, tests find its process)."""

    replica: str  # Serve's replica id (unique_id), what the router pins `finish` calls to
    node: str
    pid: int


@dataclass(frozen=True)
class EngineReport:
    """The replica's engine counters, sent last on every stream that ran to its end."""

    info: ReplicaInfo
    stats: EngineStats


@dataclass(frozen=True)
class EngineDescription:
    """What the ingress's front end needs to prepare requests exactly as this engine checks them."""

    config: Any  # the ModelConfig the model was loaded with (rope override applied)
    max_model_len: int
    num_slots: int  # max_num_seqs: the most sequences (n) one request may ask
    default_max_tokens: int
    model_info: ModelInfo
    adapters: list[str]


class EngineReplica:
    """The deployment class (`serve.deployment(EngineReplica)` in ray_serve.py)."""

    def __init__(self, model_path: str, engine_options: dict[str, Any], adapters: dict[str, str] | None = None,
                 wedged_after: float = 60.0):
        bind_grpc_to_node()  # before Serve starts this replica's gRPC server (loopback.py)
        import ray
        from ray import serve
        from ray.serve import metrics

        from ..async_llm import AsyncLLM
        from ..lora_request import LoRARequest

        self.llm = AsyncLLM(model_path, **engine_options)
        for i, (name, folder) in enumerate((adapters or {}).items()):  # `serve --lora-modules`, on every replica
            self.llm.add_lora(LoRARequest(name, i + 1, folder))
        ctx = serve.get_replica_context()
        self.info = ReplicaInfo(ctx.replica_id.unique_id, ray.get_runtime_context().get_node_id(), os.getpid())
        self.wedged_after = wedged_after
        self._last_steps, self._last_change = 0, time.monotonic()
        self.requests = metrics.Counter("deltarun_replica_requests", description="requests this replica ran")
        self.tokens = metrics.Counter("deltarun_replica_generated_tokens", description="tokens it generated")
        self.running = metrics.Gauge("deltarun_replica_sequences_running", description="sequences decoding")

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       mm: MultiModalInput | None = None, adapter: str | None = None,
                       blocks: list[int] | None = None
                       ) -> AsyncGenerator[ReplicaInfo | StepOutput | EngineReport, None]:
        """The request's step outputs, after one `ReplicaInfo` and, when it ran to its end, before one
        `EngineReport`. `blocks` is for the router only. Serve cancels this generator when the ingress drops
        the stream: the engine then aborts the request."""
        if mm is not None:
            self.llm.load_vision()
        self.requests.inc()
        yield self.info
        async with aclosing(self.llm.async_engine.generate(request_id, prompt_ids, params, mm, adapter)) as steps:
            async for step in steps:
                self.tokens.inc(sum(len(u.new_token_ids) for u in step.updates))
                yield step
        yield EngineReport(self.info, self.llm.stats())

    def describe(self) -> EngineDescription:
        llm = self.llm
        return EngineDescription(llm.config, llm.max_model_len, llm.engine.pool.num_slots, llm.default_max_tokens,
                                 llm.model_info(), llm.list_loras())

    def check_health(self) -> None:
        """Raise (Serve then replaces this replica) when the engine thread is gone or stuck."""
        engine = self.llm.engine
        if not self.llm.async_engine.alive():
            raise RuntimeError("the engine thread has stopped")
        steps, now = engine.stats["steps"], time.monotonic()
        self.running.set(engine.num_running)
        if steps != self._last_steps or not engine.has_unfinished():
            self._last_steps, self._last_change = steps, now
        elif now - self._last_change > self.wedged_after:
            raise RuntimeError(f"the engine has had work but no step for {now - self._last_change:.0f} s")

    def __del__(self) -> None:  # Serve drained it (graceful_shutdown_*) before this runs: stop the thread
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
