"""What the CLI's commands share: the model, engine and sampling flags, and turning them into `LLM`
arguments, `SamplingParams` and chat media parts (checked before any model loads)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..store.names import DEFAULT_MODEL


def sampling_flags(p: argparse.ArgumentParser) -> None:
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


def model_flags(p: argparse.ArgumentParser) -> None:
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
    lo = p.add_argument_group("LoRA adapters")
    lo.add_argument("--max-loras", type=int, default=4, help="distinct adapters one batch may mix (default 4)")
    lo.add_argument("--max-cpu-loras", type=int, help="adapters kept read in memory (default: --max-loras)")
    lo.add_argument("--max-lora-rank", type=int, help="refuse adapters of a higher rank (default: any)")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None, help="turn thinking on")
    think.add_argument("--no-think", dest="think", action="store_false", help="turn thinking off")


def sampling_params(args: argparse.Namespace, n: int = 1):
    from ..sampling import SamplingParams

    return SamplingParams(
        n=n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop=args.stop)


def load_llm(args: argparse.Namespace):
    from ..llm import LLM
    from ..store.names import is_demo
    from ..store.resolve import resolve_model

    if args.model == "demo":
        err("note: 'demo' has RANDOM WEIGHTS in the Qwen3.5-0.8B layout; its answers are noise, "
            "256 tokens each unless --max-tokens says otherwise")
    path = resolve_model(args.model)
    if is_demo(path) and args.model != "demo":
        err("note: this is the demo checkpoint with RANDOM WEIGHTS")
    llm = LLM(path, lora=getattr(args, "lora", None), **engine_options(args))
    from .startup import loaded

    loaded()  # the collector runs again (cli/process.py)
    return llm


def engine_options(args: argparse.Namespace) -> dict:
    """The model/engine flags as keyword arguments of `LLM` / `AsyncLLM`."""
    import json

    from ..engine.memory import parse_size

    rope = args.rope_scaling
    if rope and rope.lstrip().startswith("{"):
        try:
            rope = json.loads(rope)
        except json.JSONDecodeError as e:
            raise ValueError(f"--rope-scaling is not valid JSON: {e}") from None
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    for flag in ("max_num_seqs", "max_prefill_tokens", "max_loras", "max_cpu_loras", "max_lora_rank"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    from ..store.names import quant_tag

    if args.quantize:
        from ..weights.quantize import QuantSpec

        QuantSpec.parse(args.quantize)  # a bad value fails here, before any loading
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.context_length, rope_scaling=rope,
                quantization=args.quantize or quant_tag(args.model or ""), threads=args.threads,
                max_memory=parse_size(args.max_memory) if args.max_memory else None,
                prefix_cache_memory=parse_size(args.prefix_cache_memory) if args.prefix_cache_memory else None,
                max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens,
                kv_cache_dtype=args.kv_cache_dtype,
                mtp=getattr(args, "mtp", "auto"), num_speculative_tokens=getattr(args, "num_speculative_tokens", 2),
                mtp_draft_vocab=getattr(args, "mtp_draft_vocab", 32768),
                max_loras=getattr(args, "max_loras", 4), max_cpu_loras=getattr(args, "max_cpu_loras", None),
                max_lora_rank=getattr(args, "max_lora_rank", None))


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def media_part(kind: str, path: str) -> dict:
    """A chat content part for a media file given on the command line (checked before any model loads)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{kind} file not found: {path}")
    return {"type": kind, kind: str(p)}
