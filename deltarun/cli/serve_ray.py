"""`deltarun serve MODEL --ray`: the server's routes in front of engine replicas on a Ray cluster (the
application itself is deltarun/scale/ray_serve.py). Thin: flags → `ServeSpec` → Serve; Ctrl-C or SIGTERM
deletes the application (Serve drains running requests for up to --drain-timeout) and stops a Ray it started.
"""
from __future__ import annotations

import argparse
import signal
import threading

from .options import engine_options, err


def add_ray_flags(serve: argparse.ArgumentParser) -> None:
    g = serve.add_argument_group("Ray (pip install 'deltarun[ray]'; docs/scale-out.md)")
    g.add_argument("--ray", action="store_true",
                   help="serve MODEL from Ray Serve replicas, each with its own engine, across a Ray cluster")
    g.add_argument("--address", help="join the Ray cluster at this address (default: start one on loopback)")
    scale = g.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="scale replicas on ongoing requests between MIN and MAX")
    g.add_argument("--replica-threads", type=int, default=1,
                   help="CPU threads of each replica's engine, reserved as Ray CPUs (default 1)")
    g.add_argument("--max-ongoing-requests", type=int, default=None, metavar="N",
                   help="requests one replica takes before the router spills to another (default 2 × "
                        "--max-num-seqs)")
    g.add_argument("--max-replicas-per-node", type=int, default=None, metavar="N",
                   help="at most N replicas on one node (1: one engine per machine; default: as Ray places them)")
    g.add_argument("--health-check-period", type=float, default=10.0, metavar="SECONDS",
                   help="how often Serve checks each replica's engine; a dead or wedged one is replaced (default 10)")


def parse_autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        pair = (int(lo), int(hi)) if sep else None
    except ValueError:
        pair = None
    if pair is None or not 0 <= pair[0] <= pair[1] or pair[1] < 1:
        raise ValueError(f"--autoscale {text!r}: expected MIN:MAX with 0 <= MIN <= MAX and MAX >= 1")
    return pair


def cmd_serve_ray(args: argparse.Namespace, api_key: str | None, adapters: dict[str, str]) -> int:
    """`api_key`, `adapters`: what `serve` read from its key flags and --lora-modules (cli/main.py)."""
    import os

    from ..scale import require_ray
    from ..scale.loopback import local_env

    os.environ.update(local_env(args.address))  # before Ray is imported: it reads them once (loopback.py)
    require_ray()  # one line with the install hint, exit 1
    if not args.model:
        raise ValueError("--ray needs the MODEL to serve (one model per deployment)")
    if args.replicas < 1 or args.replica_threads < 1:
        raise ValueError("--replicas and --replica-threads must be >= 1")
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    from ..server.guard import host_name, is_loopback
    from ..server.targets import resolve_target

    options = engine_options(args)
    options["quantization"] = args.quantize or options.get("quantization")
    options["threads"] = args.replica_threads
    target = resolve_target(args.model, options, download=True)
    if target.quantization:
        options["quantization"] = target.quantization
    options = {k: v for k, v in options.items() if v is not None}
    if not api_key and not is_loopback(host_name(args.host)):
        err(f"warning: serving on {args.host} without an API key: anyone who can reach this address can use "
            "your models (set DELTARUN_API_KEY or --api-key-file)")
    gpu = options.get("device") == "cuda"
    from ..scale.ray_serve import ServeSpec, run

    name = args.served_model_name or args.model
    spec = ServeSpec(
        model_path=str(target.path.resolve()), name=name, aliases=(args.model,), engine_options=options,
        adapters=adapters, replicas=args.replicas, autoscale=autoscale,
        replica_cpus=float(args.replica_threads), replica_gpus=1.0 if gpu else 0.0,
        max_ongoing_requests=args.max_ongoing_requests or 2 * int(options.get("max_num_seqs", 16)),
        max_replicas_per_node=args.max_replicas_per_node,
        health_check_period_s=args.health_check_period, health_check_timeout_s=max(5.0, 3 * args.health_check_period),
        drain_timeout=args.drain_timeout,
        app=dict(api_key=api_key, cors_origins=args.cors, default_thinking=args.think, host=args.host,
                 extra_hosts=[h for a in args.allowed_hosts for h in a.split(",")],
                 max_queued_requests=args.max_queued_requests, request_timeout=args.request_timeout))
    import ray
    from ray import serve

    from ..scale.loopback import ray_init

    started = not args.address
    ray_init(args.address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run(spec, args.host, args.port)
        how = f"autoscaled {autoscale[0]}..{autoscale[1]}" if autoscale else f"{args.replicas}"
        err(f"deltarun: serving {name} on http://{args.host}:{args.port} (OpenAI: /v1, Ollama: /api) from {how} "
            f"Ray Serve replica(s) of {args.replica_threads} thread(s)")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.delete(spec.app_name)  # drains: running requests finish (up to --drain-timeout)
            if started:
                serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    return 0
