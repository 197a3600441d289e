"""`deltarun batch MODEL IN.jsonl OUT.jsonl [--ray [--address ADDR]]`: an OpenAI Batch file answered offline,
on this machine (deltarun/scale/batch_local.py) or across a Ray cluster (batch_ray.py). Thin: flags → calls.
Resumable: run the same command again and only the lines missing from OUT run.
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from .options import engine_options, model_flags


def add_batch_command(sub) -> None:
    b = sub.add_parser("batch", help="answer an OpenAI Batch file (JSONL) offline, locally or on Ray; resumable")
    model_flags(b)
    b.add_argument("input", metavar="IN", help="OpenAI Batch input (.jsonl): custom_id, method, url, body per line")
    b.add_argument("output", metavar="OUT", help="where answers are appended (.jsonl); lines already there are skipped")
    b.add_argument("--served-model-name", help="the name body.model may give (default: the MODEL argument)")
    b.add_argument("--max-in-flight", type=int, default=None,
                   help="lines running at once on one engine (default 2 × --max-num-seqs)")
    r = b.add_argument_group("Ray (pip install 'deltarun[ray]'; docs/scale-out.md)")
    r.add_argument("--ray", action="store_true", help="run the lines on a Ray Data actor pool of engines")
    r.add_argument("--address", help="join the Ray cluster at this address (default: start one on loopback)")
    r.add_argument("--actors", type=int, default=1, help="engines in the pool (default 1)")
    r.add_argument("--replica-threads", type=int, default=1, help="CPU threads per engine, reserved as Ray CPUs")
    r.add_argument("--batch-size", type=int, default=16, help="lines per Ray Data batch (default 16)")
    b.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    import os

    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise ValueError(f"input file not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError("IN and OUT must be different files")
    if args.ray:
        from ..scale import require_ray
        from ..scale.loopback import local_env

        os.environ.update(local_env(args.address))  # before Ray is imported (scale/loopback.py)
        require_ray()
    for flag in ("max_in_flight", "actors", "replica_threads", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    from ..server.targets import resolve_target

    options = engine_options(args)
    if args.ray:
        options["threads"] = args.replica_threads
    target = resolve_target(args.model, options, download=True)
    if target.quantization:
        options["quantization"] = target.quantization
    options = {k: v for k, v in options.items() if v is not None}
    name = args.served_model_name or args.model
    in_flight = args.max_in_flight or 2 * int(options.get("max_num_seqs", 16))
    if not args.ray:
        from ..async_llm import AsyncLLM
        from ..scale.batch_local import run_local

        llm = AsyncLLM(target.path, **options)
        try:
            asyncio.run(run_local(llm, name, src, dst, max_in_flight=in_flight, default_thinking=args.think))
        finally:
            llm.shutdown()
        return 0  # lines that failed are error lines in OUT, as in OpenAI's batches
    import ray

    from ..scale.batch_ray import run_ray
    from ..scale.loopback import ray_init

    ray_init(args.address)
    try:
        run_ray(str(target.path.resolve()), name, src, dst, options, actors=args.actors,
                actor_cpus=float(args.replica_threads), actor_gpus=1.0 if options.get("device") == "cuda" else 0.0,
                batch_size=args.batch_size, default_thinking=args.think)
    finally:
        ray.shutdown()
    return 0
