"""The `deltarun` command: `deltarun chat | generate | serve | init-random | list | show | pull | rm | ps | quantize |
merge | bench | finetune | batch` (thin: flags → the Python API).

Every user-facing failure ends as one line on stderr and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .options import engine_options, err, load_llm, media_part, model_flags, sampling_flags, sampling_params
from .startup import loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltarun", description="Run Qwen3.5 models locally, offline.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat in the terminal (streaming)")
    model_flags(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--lora", metavar="FOLDER", help="answer with this PEFT LoRA adapter")
    sampling_flags(chat)

    gen = sub.add_parser("generate", help="answer one prompt and print it to stdout")
    model_flags(gen)
    gen.add_argument("prompt", help="the prompt ('-' reads stdin)")
    gen.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    gen.add_argument("--system", help="system prompt")
    gen.add_argument("--lora", metavar="FOLDER", help="answer with this PEFT LoRA adapter")
    gen.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning (stderr)")
    gen.add_argument("-n", type=int, default=1, help="number of answers")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image to ask about (repeatable)")
    gen.add_argument("--video", action="append", default=[], metavar="PATH",
                     help="a video to ask about (repeatable)")
    sampling_flags(gen)

    serve = sub.add_parser("serve", help="serve the OpenAI- and Ollama-compatible HTTP API")
    model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=11435)
    serve.add_argument("--api-key", default=os.environ.get("DELTARUN_API_KEY"),
                       help="require this key ('Authorization: Bearer KEY' or 'x-api-key: KEY') on every route "
                            "(default $DELTARUN_API_KEY; argv is visible to `ps`: prefer the variable or a file)")
    serve.add_argument("--api-key-file", help="read the API key from this file (its first line)")
    serve.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME",
                       help="also answer requests whose Host is NAME (repeatable, or comma-separated in "
                            "$DELTARUN_ALLOWED_HOSTS; '*' = any). Loopback names and this machine's own are "
                            "always accepted")
    serve.add_argument("--cors", action="append", metavar="ORIGIN",
                       help="allow this browser origin (repeatable; '*' = any)")
    serve.add_argument("--max-queued-requests", type=int, default=256, metavar="N",
                       help="per model, answer 429 (Retry-After) while N requests already wait (default 256)")
    serve.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                       help="end a request that runs longer (queue wait included) with an error in its API's "
                            "shape: 408, or an error event when streaming (default: no limit)")
    serve.add_argument("--served-model-name", help="model name clients use (default: the MODEL argument)")
    serve.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=FOLDER",
                       help="serve PEFT LoRA adapters of MODEL: a request naming NAME as its model runs MODEL "
                            "with that adapter (repeatable; also '{\"name\": …, \"path\": …}' as vLLM takes)")
    serve.add_argument("--allow-http-media", action="store_true",
                       help="let requests name images/videos by http(s) URL, which the server then downloads")
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM stop accepting, let running requests finish for up to this long, then "
                            "end them and exit 0 (default 30)")
    serve.add_argument("--allow-private-media", action="store_true",
                       help="with --allow-http-media, also fetch from loopback, private and link-local addresses "
                            "(refused by default: the server would fetch what only it can reach)")
    serve.set_defaults(model=None)  # no model: start empty, load models on request
    next(a for a in serve._actions if a.dest == "model").help = \
        "model to load at start and keep loaded (default none: every model loads on its first request)"
    serve.add_argument("--keep-alive", default=os.environ.get("DELTARUN_KEEP_ALIVE", "5m"),
                       help="how long a model loaded on request stays after its last request: 5m, 1h, 30s, "
                            "0 = unload at once, -1 = forever (default 5m or $DELTARUN_KEEP_ALIVE; the MODEL "
                            "argument stays loaded)")
    from .serve_ray import add_ray_flags
    add_ray_flags(serve)
    serve.add_argument("--max-loaded-models", type=int, default=os.environ.get("DELTARUN_MAX_LOADED_MODELS", "3"),
                       help="models held at once; loading another unloads the least recently used idle one "
                            "(default 3 or $DELTARUN_MAX_LOADED_MODELS)")

    init = sub.add_parser("init-random", help="write a random-weights checkpoint in the official layout")
    init.add_argument("config", help="0.8B, 2B, 4B, 9B (bundled official configs) or a config.json path")
    init.add_argument("out", help="output folder")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    from .models import add_model_commands
    add_model_commands(sub)  # list, show, pull, rm
    from .tools import add_tool_commands
    add_tool_commands(sub)  # quantize, merge, bench
    from .batch import add_batch_command
    add_batch_command(sub)  # batch (OpenAI Batch files, locally or on Ray)
    from .finetune import add_finetune_command
    add_finetune_command(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params(args, n=args.n)  # validate flags before the (slow) model load
    media = [media_part("image", p) for p in args.image] + [media_part("video", p) for p in args.video]
    if media and args.raw:
        raise ValueError("--image/--video need the chat template: drop --raw")
    llm = load_llm(args)
    if args.raw:
        for out in llm.generate(prompt, params)[0].outputs:
            print(out.text, flush=True)
        return 0
    content = media + [{"type": "text", "text": prompt}] if media else prompt
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": content}]
    if args.n == 1:  # stream
        for d in llm.chat_stream(messages, params, enable_thinking=args.think):
            if d.reasoning and not args.hide_thinking:
                sys.stderr.write(f"\x1b[2m{d.reasoning}\x1b[0m" if sys.stderr.isatty() else d.reasoning)
                sys.stderr.flush()
            if d.content:
                sys.stdout.write(d.content)
                sys.stdout.flush()
        print()
        return 0
    for c in llm.chat(messages, params, enable_thinking=args.think).outputs:
        if c.reasoning and not args.hide_thinking:
            err(c.reasoning)
        print(c.content, flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.request_timeout is not None and not args.request_timeout > 0:  # before any model loads
        raise ValueError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}")
    if args.ray:
        from .serve_ray import cmd_serve_ray
        return cmd_serve_ray(args, api_key_of(args), lora_modules(args.lora_modules))
    import uvicorn

    from ..lora_request import LoRARequest
    from ..server import create_app
    from ..server.guard import host_name, is_loopback
    from ..server.model_manager import ModelManager
    from ..server.targets import load_llm, parse_keep_alive, resolve_target

    keep_alive = parse_keep_alive(args.keep_alive)
    options = engine_options(args)
    options["quantization"] = args.quantize  # for every model; a tag in a model's name wins (targets.py)

    adapters = lora_modules(args.lora_modules)
    if adapters and not args.model:
        raise ValueError("--lora-modules needs the MODEL the adapters were trained on")
    base_path: list[Path] = []

    def allow_http(llm) -> None:
        llm.image_config.allow_http = llm.video_config.allow_http = args.allow_http_media
        llm.image_config.allow_private = llm.video_config.allow_private = args.allow_private_media
        if base_path and Path(str(llm.path)).resolve() == base_path[0]:  # the base, loaded again after an unload
            for lora_name, folder in adapters.items():
                llm.add_lora(LoRARequest(lora_name, 0, folder))

    models = ModelManager(options, keep_alive=keep_alive, max_loaded=args.max_loaded_models, on_load=allow_http)
    name = args.served_model_name or args.model
    if adapters:
        check_adapter_names(adapters, {name, args.model}, options)
    if args.model:  # preloaded (downloaded when needed), and kept loaded
        if args.model == "demo":
            err("note: 'demo' has RANDOM WEIGHTS in the Qwen3.5-0.8B layout; its answers are noise, "
                "256 tokens each unless a request sets its length")
        target = resolve_target(args.model, options, download=True)
        llm = load_llm(target, options)
        base_path.append(Path(str(llm.path)).resolve())
        allow_http(llm)  # registers the adapters: a bad one fails the start, one line
        models.adopt(llm, name, names=(args.model,), key=target.key)
        models.adapters = {lora_name: name for lora_name in adapters}
        models.loads += 1
    api_key = api_key_of(args)
    if not api_key and not is_loopback(host_name(args.host)):
        err(f"warning: serving on {args.host} without an API key: anyone who can reach this address can use "
            "and manage your models (set DELTARUN_API_KEY or --api-key-file)")
    # --think/--no-think set the server-wide default; each request may still switch it
    app = create_app(models, api_key=api_key, cors_origins=args.cors, default_thinking=args.think,
                     host=args.host, extra_hosts=[h for a in args.allowed_hosts for h in a.split(",")],
                     max_queued_requests=args.max_queued_requests, request_timeout=args.request_timeout)
    what = f"serving {name}" if name else "no model loaded yet (loaded on request)"
    err(f"deltarun: {what} on http://{args.host}:{args.port} (OpenAI: /v1, Ollama: /api)")
    # SIGTERM: uvicorn drains (stops accepting, waits up to --drain-timeout), the app's shutdown unloads, and
    # then uvicorn re-raises the signal to the handler it found: this no-op one, so the exit is a clean 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.drain_timeout)
    return 0


def lora_modules(specs: list[str]) -> dict[str, str]:
    """`--lora-modules` values (NAME=FOLDER, or vLLM's JSON form) → {name: folder}."""
    import json

    out: dict[str, str] = {}
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                obj = json.loads(spec)
                name, folder = str(obj["name"]), str(obj["path"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--lora-modules {spec!r}: expected NAME=FOLDER or {{\"name\": …, \"path\": …}}") \
                    from None
        else:
            name, sep, folder = spec.partition("=")
            if not sep or not name or not folder:
                raise ValueError(f"--lora-modules {spec!r}: expected NAME=FOLDER")
        if name in out:
            raise ValueError(f"--lora-modules: the name {name!r} is given twice")
        out[name] = folder
    return out


def check_adapter_names(adapters: dict[str, str], served: set[str | None], options: dict) -> None:
    """An adapter may not take a name that already means a model: the served one or any local model."""
    from ..server.targets import resolve_target
    from ..store.names import ModelNotFound

    for lora_name in adapters:
        taken = lora_name in served
        if not taken:
            try:
                resolve_target(lora_name, options)
                taken = True
            except ModelNotFound:
                pass
        if taken:
            raise ValueError(f"--lora-modules: the name {lora_name!r} is already a model's; give the adapter another")


def api_key_of(args: argparse.Namespace) -> str | None:
    """The key `serve` requires: --api-key-file's first line, else --api-key (default $DELTARUN_API_KEY)."""
    if not args.api_key_file:
        return args.api_key or None
    try:
        key = Path(args.api_key_file).read_text().splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError):
        key = ""
    if not key:
        raise SystemExit(f"deltarun: no API key in {args.api_key_file} (its first line is the key)")
    return key


def cmd_init_random(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from ..atomic import publish_dir, sweep, temp_path
    from ..weights.random_init import write_random_checkpoint

    out = Path(args.out).expanduser()
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise ValueError(f"{out} holds files and no model: give a new folder (or a model folder to replace)")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out.parent)
    tmp = temp_path(out)  # written whole beside it, then renamed: a killed run leaves no half model
    try:
        write_random_checkpoint(args.config, tmp, seed=args.seed, dtype=getattr(torch, args.dtype))
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote a random-weights checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..config import ConfigError
    from ..store.names import ModelNotFound
    from ..weights.loader import LoadError

    if args.command not in ("generate", "chat"):  # these resume it once their model is loaded (load_llm)
        loaded()
    try:
        if args.command == "chat":
            from .chat import run_chat
            return run_chat(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        from .models import is_model_command, run_model_command
        if is_model_command(args.command):
            return run_model_command(args)
        if hasattr(args, "func"):  # quantize, merge, bench
            return args.func(args)
        return cmd_init_random(args)
    except (ModelNotFound, LoadError, ConfigError, ValueError, FileNotFoundError, OSError) as e:
        err(f"deltarun: error: {e}")
        return 1
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except BrokenPipeError:
        return 0

