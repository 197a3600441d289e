"""`deltarun finetune BASE DATA.jsonl OUT`: LoRA training into a PEFT adapter folder (thin: flags → train.finetune).

Bad input (a missing file, a malformed JSONL line, a conversation with nothing to learn, a bad flag) ends as one
line on stderr and exit code 1, as every command does (cli/main.py).
"""
from __future__ import annotations

import argparse
import sys


def add_finetune_command(sub) -> None:
    f = sub.add_parser("finetune", help="train a LoRA adapter on chat JSONL: a PEFT folder deltarun and peft load")
    f.add_argument("model", help="base model folder or name (a Hugging Face checkpoint)")
    f.add_argument("data", help='chat JSONL: one {"messages": [...], "tools": [...]} conversation a line')
    f.add_argument("out", help="output folder: the adapter, and OUT/checkpoint to resume from")
    f.add_argument("--rank", "-r", type=int, default=16, help="LoRA rank (default 16)")
    f.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32: scale alpha/rank)")
    f.add_argument("--rslora", action="store_true", help="scale alpha/√rank (use_rslora)")
    f.add_argument("--target-modules", default="all-linear",
                   help="comma-separated projections (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,"
                        "in_proj_qkv,in_proj_z,in_proj_a,in_proj_b,out_proj) or all-linear (default)")
    f.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    f.add_argument("--steps", type=int, help="optimizer steps in all, whatever the epochs")
    f.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    f.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 5%% of the steps)")
    f.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"],
                   help="learning rate after the warmup (default cosine)")
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--batch-tokens", type=int, default=2048,
                   help="tokens per packed row (longer conversations are cut; default 2048)")
    f.add_argument("--grad-accum", type=int, default=1, help="packed rows per optimizer step (default 1)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-checkpointing", action="store_true",
                   help="keep every layer's activations (faster, about twice the memory)")
    f.add_argument("--compute", default="auto", choices=["auto", "fp32", "bf16"],
                   help="matmul precision (default auto: bf16 where the CPU or GPU has fast bf16, else fp32)")
    f.add_argument("--device", default="auto", help="auto, cpu or cuda")
    f.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    f.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="write OUT/checkpoint every STEPS steps (default: only at the end)")
    f.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings and data)")
    f.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..train.loop import TrainConfig, finetune

    targets = args.target_modules.strip()
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, use_rslora=args.rslora,
                      target_modules=targets if targets == "all-linear" else
                      [t.strip() for t in targets.split(",") if t.strip()],
                      epochs=args.epochs, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
                      schedule=args.schedule, weight_decay=args.weight_decay, batch_tokens=args.batch_tokens,
                      grad_accum=args.grad_accum, seed=args.seed, checkpointing=not args.no_checkpointing,
                      compute=args.compute, device=args.device, threads=args.threads, save_every=args.save_every,
                      resume=args.resume)
    cfg.check()
    res = finetune(args.model, args.data, args.out, cfg, progress=sys.stderr.isatty())
    last = f", last loss {res.losses[-1]:.4f}" if res.losses else ""
    print(f"done: {res.steps} steps{last}, {res.tokens_per_s:.1f} tokens/s → {res.out} "
          f"(load it with `deltarun chat MODEL --lora {res.out}` or peft)", file=sys.stderr)
    return 0
