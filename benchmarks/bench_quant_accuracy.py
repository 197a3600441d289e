"""Accuracy of every quantized path against bf16: weight-only int8/int4, int8 KV cache, GGUF files.

For a fixed prompt set (8 texts: prose, code, a chat turn, Chinese, numbers …, tokenized once) each
variant runs through the real engine (`LLM.generate`, chunked prefill, batched decode) and is compared
with the bf16 model on the same token ids:

- mean |Δ logprob|: teacher-forced log-probability of every prompt token, |variant − bf16|, averaged;
- top-1 agree: share of prompt positions where the variant's most likely next token is bf16's;
- greedy: 32 greedy tokens per prompt; "same tokens" = share of tokens equal to bf16's up to the first
  divergence, "same seqs" = prompts whose 32 tokens are all identical.

The fp32 row is the yardstick: what bf16 rounding alone changes. GGUF rows appear for the files that
`bench_cpu.py --llama-cpp …` wrote with llama.cpp's converter and llama-quantize (MODEL/gguf/*.gguf).
With random weights the next-token distributions are nearly flat (small top-1 margins), so agreement is
a pessimistic bound; |Δ logprob| is the stable measure.

    python benchmarks/bench_quant_accuracy.py                       # the random 0.8B bench checkpoint
    python benchmarks/bench_quant_accuracy.py --model DIR --variants fp32,int8,int4
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cpu import DEFAULT_MODEL, ensure_model  # noqa: E402

from deltarun import LLM, SamplingParams  # noqa: E402

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
    "quickly and cheaply. Within fifty years presses were running in more than two hundred cities.",
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    i = j = 0\n    out = []\n"
    "    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n"
    "        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n",
    "<|im_start|>user\nCan you explain why the sky is blue, in two sentences?<|im_end|>\n<|im_start|>assistant\n",
    "量子计算是一种遵循量子力学规律调控量子信息单元进行计算的新型计算模式。与传统计算机相比，"
    "量子计算机在某些问题上具有指数级的加速潜力，例如大数分解和量子系统模拟。",
    "Quarterly revenue rose 12.4% to $3.91 billion, while operating margin fell from 18.2% to 16.7%. "
    "Free cash flow was $612 million; the board approved a dividend of $0.45 per share.",
    "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui racontait chaque "
    "soir des histoires aux enfants. Ses récits parlaient de navires perdus et de trésors oubliés.",
    '{"name": "deltarun", "version": "0.1.0", "dependencies": {"torch": ">=2.4", "safetensors": "*"}, '
    '"scripts": {"test": "pytest -q", "bench": "python benchmarks/bench_cpu.py"}, "private": true}',
    "To prove that there are infinitely many primes, suppose there were only finitely many, p1, p2, ..., pn. "
    "Consider N = p1 p2 ... pn + 1. No pi divides N, so N has a prime factor not in the list.",
]
GREEDY = 32


def run_variant(path: str, prompts: list[list[int]], dtype: str, quantization: str | None,
                kv: str) -> tuple[list[list[float]], list[list[int]], list[list[int]]]:
    """(prompt-token logprobs, top-1 ids per position, greedy ids) for every prompt."""
    llm = LLM(path, dtype=dtype, device="cpu", quantization=quantization, kv_cache_dtype=kv,
              prefix_cache_memory=0, mtp="off")
    params = SamplingParams(temperature=0, max_tokens=GREEDY, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, params)
    lps, tops, greedy = [], [], []
    for p, o in zip(prompts, outs):
        entries = o.prompt_logprobs[1:]  # the first token has none
        lps.append([e[t].logprob for t, e in zip(p[1:], entries)])
        tops.append([next(t for t, lp in e.items() if lp.rank == 1) for e in entries])
        greedy.append(list(o.outputs[0].token_ids))
    del llm
    gc.collect()
    return lps, tops, greedy


def compare(ref, var) -> dict:
    (rl, rt, rg), (vl, vt, vg) = ref, var
    dlp = [abs(a - b) for r, v in zip(rl, vl) for a, b in zip(r, v)]
    top = [a == b for r, v in zip(rt, vt) for a, b in zip(r, v)]
    same, full = [], 0
    for r, v in zip(rg, vg):
        n = next((i for i, (a, b) in enumerate(zip(r, v)) if a != b), len(r))
        same.append(n / len(r))
        full += n == len(r)
    return {"dlp": statistics.fmean(dlp), "dlp_max": max(dlp), "top1": statistics.fmean(top),
            "same": statistics.fmean(same), "full": full}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--variants", default="fp32,int8,int4,int4:32,int4:128,kv-int8",
                    help="fp32, int8, int4[:G], kv-int8 (bf16 weights, int8 KV cache)")
    ap.add_argument("--gguf", default="BF16,Q8_0,Q4_0,Q4_K_M", help="GGUF types under MODEL/gguf (if written)")
    a = ap.parse_args(argv)
    model = ensure_model(a.model.expanduser())
    llm = LLM(str(model), dtype="bfloat16", device="cpu", mtp="off")
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    del llm
    n_tok = sum(len(p) - 1 for p in prompts)
    print(f"# {model.name}: {len(prompts)} prompts, {n_tok} scored prompt tokens, {GREEDY} greedy tokens each; "
          f"reference bf16", file=sys.stderr)
    ref = run_variant(str(model), prompts, "bfloat16", None, "auto")
    rows = []
    for v in [x for x in a.variants.split(",") if x]:
        dtype = "float32" if v == "fp32" else "bfloat16"
        quant = v if v.startswith("int") else None
        rows.append((v, compare(ref, run_variant(str(model), prompts, dtype, quant,
                                                 "int8" if v == "kv-int8" else "auto"))))
        print(f"  {v}: {rows[-1][1]}", file=sys.stderr, flush=True)
    for t in [x for x in a.gguf.split(",") if x]:
        f = model / "gguf" / f"model-{t.lower() if t == 'BF16' else t}.gguf"
        if not f.is_file():
            print(f"  GGUF {t}: {f} not found, skipped", file=sys.stderr)
            continue
        rows.append((f"GGUF {t}", compare(ref, run_variant(str(f), prompts, "bfloat16", None, "auto"))))
        print(f"  GGUF {t}: {rows[-1][1]}", file=sys.stderr, flush=True)
    print(f"| variant vs bf16 | mean abs Δ logprob | max abs Δ logprob | top-1 agree | greedy same tokens "
          f"| greedy same seqs (of {len(prompts)}) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['dlp']:.4f} | {r['dlp_max']:.3f} | {r['top1']:.3f} | {r['same']:.3f} | {r['full']} |")


if __name__ == "__main__":
    main()
