"""`deltarun quantize`, `deltarun merge` and `deltarun bench`: tools around a model folder (thin: flags → calls)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_tool_commands(sub) -> None:
    q = sub.add_parser("quantize", help="write an int8/int4 copy of a model that loads without re-quantizing")
    q.add_argument("model", help="model folder or name (as for chat)")
    q.add_argument("out", help="output folder")
    q.add_argument("--bits", type=int, choices=[4, 8], default=4)
    q.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128, 256],
                   help="int4 values per scale/zero (default 64)")
    q.set_defaults(func=cmd_quantize)

    m = sub.add_parser("merge", help="fold a PEFT LoRA adapter into a model: a checkpoint that loads like any other")
    m.add_argument("model", help="base model folder or name (a Hugging Face checkpoint, not GGUF or quantized)")
    m.add_argument("adapter", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("out", help="output folder")
    m.add_argument("--max-lora-rank", type=int, help="refuse adapters of a higher rank")
    m.set_defaults(func=cmd_merge)

    b = sub.add_parser("bench", help="prefill/decode tokens/s, peak memory and load time on this machine")
    b.add_argument("model", help="model folder or name (e.g. demo: random weights, same speed)")
    b.add_argument("--variants", default="bf16,int8,int4",
                   help="comma-separated: bf16, fp32, int8, int4, int4:32, fp32+int8 … (default bf16,int8,int4)")
    b.add_argument("--prompt-lens", default="512,4096", help="prefill lengths (default 512,4096)")
    b.add_argument("--gen-len", type=int, default=128, help="decode tokens (default 128)")
    b.add_argument("--reps", type=int, default=3, help="interleaved repetitions per variant (default 3)")
    b.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    b.set_defaults(func=cmd_bench)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..store.resolve import resolve_model
    from ..weights.quantize import QuantSpec, save_quantized

    src = resolve_model(args.model)
    spec = QuantSpec(args.bits, args.group_size)
    out = Path(args.out).expanduser()
    if out.resolve() == Path(src).resolve():
        raise ValueError("the output folder must differ from the model folder")
    print(f"quantizing {src} to {spec.name}" + (f" (group {spec.group_size})" if spec.bits == 4 else "")
          + f" → {out}", file=sys.stderr)
    sizes = save_quantized(src, out, spec)
    print(f"done: weights {sizes['before'] / 2**30:.2f} GiB → {sizes['after'] / 2**30:.2f} GiB; "
          f"run it with `deltarun chat {out}`", file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..store.resolve import resolve_model
    from ..weights.lora import merge

    src = resolve_model(args.model)
    print(f"merging {args.adapter} into {src} → {args.out}", file=sys.stderr)
    out = merge(src, args.adapter, args.out, args.max_lora_rank)
    print(f"done: run it with `deltarun chat {out}`", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import bench
    from ..store.resolve import resolve_model
    from ..weights.quantize import QuantSpec

    folder = str(resolve_model(args.model))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        dtype, quant = bench.split_variant(v)
        if dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"unknown variant {v!r}; use bf16, fp32, fp16, int8, int4, int4:GROUP or DTYPE+QUANT")
        QuantSpec.parse(quant)
    try:
        lens = [int(x) for x in args.prompt_lens.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--prompt-lens takes comma-separated integers, not {args.prompt_lens!r}") from None
    if any(n < 1 for n in lens) or args.gen_len < 1 or args.reps < 1:
        raise ValueError("--prompt-lens, --gen-len and --reps must be >= 1")
    print(f"benchmarking {folder}: {', '.join(variants)}; pp {lens}, tg{args.gen_len}, {args.reps} reps",
          file=sys.stderr)
    results = bench.bench(folder, variants, lens, args.gen_len, args.reps, args.threads,
                          log=lambda s: print(s, file=sys.stderr))
    print(bench.table(results, lens, args.gen_len))
    print("\npaths that ran:\n" + bench.describe_paths(results))
    return 0 if all("error" not in r for runs in results.values() for r in runs) else 1
