"""Command line: `deltarun chat | generate | serve | init-random | list | show | pull | rm | ps | quantize |
bench` (thin: flags → the Python API).

Every user-facing failure ends as one line on stderr and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .weights.hub import DEFAULT_MODEL


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset knobs take the model card's recommended values)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-tokens", type=int, help="most tokens to generate (default: 32768 or the context end)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model folder, qwen3.5:0.8b|2b|4b|9b, an org/repo id, or 'demo' (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16), float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--context-length", type=int, help="most tokens per conversation (default: the model's)")
    p.add_argument("--rope-scaling", help="rope override past 262,144 tokens: yarn:FACTOR or a JSON object")
    p.add_argument("--quantize", metavar="int8|int4[:GROUP]",
                   help="weight-only quantization applied while loading (also a name tag: qwen3.5:0.8b-int4)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores, or $DELTARUN_THREADS)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-memory", help="memory for running sequences' state, e.g. 8G (default: half the free)")
    e.add_argument("--prefix-cache-memory", help="memory for prefix reuse snapshots, e.g. 2G (0 = off)")
    e.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="int8: hold keys/values in 8 bits (half the memory of bf16 at long context)")
    e.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (default 16)")
    e.add_argument("--max-prefill-tokens", type=int, default=512, help="prompt tokens per step (default 512)")
    e.add_argument("--mtp", choices=["on", "off", "auto"], default="auto",
                   help="speculative decoding with the model's MTP head (default auto: only while it is faster)")
    e.add_argument("--num-speculative-tokens", type=int, default=2, help="MTP drafts per step (default 2)")
    e.add_argument("--mtp-draft-vocab", type=int, default=32768,
                   help="MTP drafts only among the first N token ids, the most frequent (default 32768; 0 = all)")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None, help="turn thinking on")
    think.add_argument("--no-think", dest="think", action="store_false", help="turn thinking off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltarun", description="Run Qwen3.5 models locally, offline.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat in the terminal (streaming)")
    _model_flags(chat)
    chat.add_argument("--system", help="system prompt")
    _sampling_flags(chat)

    gen = sub.add_parser("generate", help="answer one prompt and print it to stdout")
    _model_flags(gen)
    gen.add_argument("prompt", help="the prompt ('-' reads stdin)")
    gen.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    gen.add_argument("--system", help="system prompt")
    gen.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning (stderr)")
    gen.add_argument("-n", type=int, default=1, help="number of answers")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image to ask about (repeatable)")
    gen.add_argument("--video", action="append", default=[], metavar="PATH",
                     help="a video to ask about (repeatable)")
    _sampling_flags(gen)

    serve = sub.add_parser("serve", help="serve the OpenAI- and Ollama-compatible HTTP API")
    _model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=11435)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route")
    serve.add_argument("--cors", action="append", metavar="ORIGIN", help="allow this browser origin (repeatable; '*' = any)")
    serve.add_argument("--served-model-name", help="model name clients use (default: the MODEL argument)")
    serve.add_argument("--allow-http-media", action="store_true",
                       help="let requests name images/videos by http(s) URL, which the server then downloads")
    serve.set_defaults(model=None)  # no model: start empty, load models on request
    next(a for a in serve._actions if a.dest == "model").help = \
        "model to load at start and keep loaded (default none: every model loads on its first request)"
    serve.add_argument("--keep-alive", default=os.environ.get("DELTARUN_KEEP_ALIVE", "5m"),
                       help="how long a model loaded on request stays after its last request: 5m, 1h, 30s, "
                            "0 = unload at once, -1 = forever (default 5m or $DELTARUN_KEEP_ALIVE; the MODEL "
                            "argument stays loaded)")
    serve.add_argument("--max-loaded-models", type=int, default=os.environ.get("DELTARUN_MAX_LOADED_MODELS", "3"),
                       help="models held at once; loading another unloads the least recently used idle one "
                            "(default 3 or $DELTARUN_MAX_LOADED_MODELS)")

    init = sub.add_parser("init-random", help="write a random-weights checkpoint in the official layout")
    init.add_argument("config", help="0.8B, 2B, 4B, 9B (bundled official configs) or a config.json path")
    init.add_argument("out", help="output folder")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    from .cli_models import add_model_commands
    add_model_commands(sub)  # list, show, pull, rm
    from .cli_tools import add_tool_commands
    add_tool_commands(sub)  # quantize, bench
    return parser


def sampling_params(args: argparse.Namespace, n: int = 1):
    from .sampling import SamplingParams

    return SamplingParams(
        n=n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop=args.stop)


def load_llm(args: argparse.Namespace):
    from .llm import LLM
    from .weights.hub import is_demo, resolve_model

    if args.model == "demo":
        _err("note: 'demo' has RANDOM WEIGHTS in the Qwen3.5-0.8B layout; its answers are noise")
    path = resolve_model(args.model)
    if is_demo(path) and args.model != "demo":
        _err("note: this is the demo checkpoint with RANDOM WEIGHTS")
    return LLM(path, **engine_options(args))


def engine_options(args: argparse.Namespace) -> dict:
    """The model/engine flags as keyword arguments of `LLM` / `AsyncLLM`."""
    import json

    from .engine.memory import parse_size

    rope = args.rope_scaling
    if rope and rope.lstrip().startswith("{"):
        try:
            rope = json.loads(rope)
        except json.JSONDecodeError as e:
            raise ValueError(f"--rope-scaling is not valid JSON: {e}") from None
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    for flag in ("max_num_seqs", "max_prefill_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    from .weights.hub import quant_tag

    if args.quantize:
        from .weights.quantize import QuantSpec

        QuantSpec.parse(args.quantize)  # a bad value fails here, before any loading
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.context_length, rope_scaling=rope,
                quantization=args.quantize or quant_tag(args.model or ""), threads=args.threads,
                max_memory=parse_size(args.max_memory) if args.max_memory else None,
                prefix_cache_memory=parse_size(args.prefix_cache_memory) if args.prefix_cache_memory else None,
                max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens,
                kv_cache_dtype=args.kv_cache_dtype,
                mtp=getattr(args, "mtp", "auto"), num_speculative_tokens=getattr(args, "num_speculative_tokens", 2),
                mtp_draft_vocab=getattr(args, "mtp_draft_vocab", 32768))


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def media_part(kind: str, path: str) -> dict:
    """A chat content part for a media file given on the command line (checked before any model loads)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{kind} file not found: {path}")
    return {"type": kind, kind: str(p)}


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
            _err(c.reasoning)
        print(c.content, flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    import uvicorn

    from .server import create_app
    from .server.models import ModelManager
    from .server.targets import load_llm, parse_keep_alive, resolve_target

    keep_alive = parse_keep_alive(args.keep_alive)
    options = engine_options(args)
    options["quantization"] = args.quantize  # for every model; a tag in a model's name wins (targets.py)

    def allow_http(llm) -> None:
        llm.image_config.allow_http = llm.video_config.allow_http = args.allow_http_media

    models = ModelManager(options, keep_alive=keep_alive, max_loaded=args.max_loaded_models, on_load=allow_http)
    name = args.served_model_name or args.model
    if args.model:  # preloaded (downloaded when needed), and kept loaded
        if args.model == "demo":
            _err("note: 'demo' has RANDOM WEIGHTS in the Qwen3.5-0.8B layout; its answers are noise")
        target = resolve_target(args.model, options, download=True)
        llm = load_llm(target, options)
        allow_http(llm)
        models.adopt(llm, name, names=(args.model,), key=target.key)
        models.loads += 1
    # --think/--no-think set the server-wide default; each request may still switch it
    app = create_app(models, api_key=args.api_key, cors_origins=args.cors, default_thinking=args.think)
    what = f"serving {name}" if name else "no model loaded yet (loaded on request)"
    _err(f"deltarun: {what} on http://{args.host}:{args.port} (OpenAI: /v1, Ollama: /api)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")  # the app's shutdown unloads
    return 0


def cmd_init_random(args: argparse.Namespace) -> int:
    import torch

    from .weights.random_init import write_random_checkpoint

    out = write_random_checkpoint(args.config, Path(args.out), seed=args.seed, dtype=getattr(torch, args.dtype))
    print(f"wrote a random-weights checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .weights.hub import ModelNotFound
    from .weights.loader import LoadError

    try:
        if args.command == "chat":
            from .chat_repl import run_chat
            return run_chat(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        from .cli_models import is_model_command, run_model_command
        if is_model_command(args.command):
            return run_model_command(args)
        if hasattr(args, "func"):  # quantize, bench
            return args.func(args)
        return cmd_init_random(args)
    except (ModelNotFound, LoadError, ConfigError, ValueError, FileNotFoundError, OSError) as e:
        _err(f"deltarun: error: {e}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
