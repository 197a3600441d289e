"""The Ray Serve application of `deltarun serve --ray`: an engine deployment and an HTTP ingress.

- `EngineReplica` (ray_replica.py), N replicas or autoscaled on ongoing requests, each with its own engine
  and `replica_threads` CPUs (or one GPU) as Ray resources, routed by prefix (routes.py), health-checked,
  drained on scale-down (Serve waits for running requests up to `graceful_shutdown_timeout_s`).
- `Ingress`: the very FastAPI app of `deltarun serve` (server/app.py: every route, the Host/Origin, key and
  body rules, the web page, /metrics), built in its replica over `RemoteModels`/`RemoteClient`, plus
  `GET /ray/replicas` (what it saw of each engine replica). Serve's HTTP proxy runs on the head node only,
  at `--host/--port`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .loopback import bind_grpc_to_node


@dataclass
class ServeSpec:
    """Everything `serve --ray` decides before Ray starts (plain data: it travels to the replicas)."""

    model_path: str
    name: str
    aliases: tuple[str, ...] = ()
    engine_options: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA name → folder (on every node)
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; None: `replicas` fixed
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing_requests: int = 32  # per replica: past it, the router spills to another
    max_replicas_per_node: int | None = None  # e.g. 1: one engine per machine
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    wedged_after: float = 60.0
    drain_timeout: float = 30.0
    app: dict[str, Any] = field(default_factory=dict)  # create_app keywords (host, api_key, cors, ...)
    app_name: str = "deltarun"


class Ingress:
    """The HTTP front door: `deltarun serve`'s app over the engine deployment's handle."""

    def __init__(self, engine: Any, spec: ServeSpec):
        bind_grpc_to_node()
        self.engine, self.spec = engine, spec

    async def __serve_build_asgi_app__(self) -> Any:
        from ..server import create_app
        from .ray_client import RemoteClient
        from .ray_models import RemoteModels

        spec = self.spec
        desc = await self.engine.describe.remote()
        client = RemoteClient(spec.model_path, self.engine, desc)
        models = RemoteModels(client, spec.name, spec.aliases)
        models.adapters = {a: spec.name for a in spec.adapters}
        app = create_app(models, **spec.app)

        @app.get("/ray/replicas")
        async def replicas() -> dict[str, Any]:
            """Per engine replica: requests routed here, running, failed, prefix-cache hits."""
            return {"model": spec.name, "replicas": client.replicas()}

        return app


def build_app(spec: ServeSpec) -> Any:
    """The bound Serve application (pass to `serve.run`)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .ray_replica import EngineReplica
    from .routes import PrefixAffinityRouter

    scaling: dict[str, Any]
    if spec.autoscale is not None:
        lo, hi = spec.autoscale
        scaling = {"autoscaling_config": {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
            # a replica decodes max_num_seqs sequences per step: past that, requests queue in its engine
            "target_ongoing_requests": max(1, int(spec.engine_options.get("max_num_seqs") or 16)),
            "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}}
    else:
        scaling = {"num_replicas": spec.replicas}
    options: dict[str, Any] = dict(
        name=f"{spec.app_name}-engine", max_ongoing_requests=spec.max_ongoing_requests,
        ray_actor_options={"num_cpus": spec.replica_cpus, "num_gpus": spec.replica_gpus},
        health_check_period_s=spec.health_check_period_s, health_check_timeout_s=spec.health_check_timeout_s,
        graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=spec.drain_timeout,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter),  # type: ignore[arg-type]  # a class or its import path
        **scaling)
    if spec.max_replicas_per_node:
        options["max_replicas_per_node"] = spec.max_replicas_per_node
    engine = serve.deployment(**options)(EngineReplica)
    ingress = serve.deployment(
        name=f"{spec.app_name}-ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,  # the engines bound the work; the app answers 429 past --max-queued-requests
        graceful_shutdown_timeout_s=spec.drain_timeout)(serve.ingress()(Ingress))
    return ingress.bind(engine.bind(spec.model_path, spec.engine_options, spec.adapters, spec.wedged_after), spec)


def run(spec: ServeSpec, host: str, port: int) -> None:
    """Start Serve's proxy at host:port (head node) and deploy the application; returns once it is ready."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    serve.run(build_app(spec), name=spec.app_name, route_prefix="/", blocking=False)
