"""MTP speculative decoding: decode tok/s with MTP off / on / auto, Qwen3.5-0.8B shape, CPU.

Random weights accept (almost) no drafts, so besides the real head the verifier is *forced* to accept
each draft with probability p (benchmark-only: the greedy agreement test is replaced on this engine
instance; the tokens are then meaningless but every cost — drafting, the k+1-position verify, the
DeltaNet state rewind — is the real one). Reports speedup against acceptance rate, per k, with the
engine's measured acceptance, as a Markdown table. Each configuration runs on a fresh engine.

    python benchmarks/bench_mtp.py                                # 0.8B bf16, k=1,2,3, p=0.5…0.95
    python benchmarks/bench_mtp.py --quick                        # smoke run
    python benchmarks/bench_mtp.py --model DIR --batch 4 --tokens 128 --threads 8
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_generate import TOKEN_RANGE, ensure_checkpoint  # noqa: E402

from deltarun.engine import speculative  # noqa: E402
from deltarun.engine.engine import Engine, EngineConfig  # noqa: E402
from deltarun.sampling import SamplingParams  # noqa: E402
from deltarun.weights.loader import load_model  # noqa: E402
from deltarun.weights.mtp_loader import load_mtp  # noqa: E402

EXACT_AGREES = speculative.agrees


def run(model, head, a, mode: str, k: int, forced: float | None) -> dict:
    """Decode a.tokens greedy tokens for a.batch requests; tok/s over the steps where all decode."""
    eng = Engine(model, eos_token_ids=[], config=EngineConfig(
        mtp=mode, num_speculative_tokens=k, prefix_cache_memory=0, max_num_seqs=max(4, a.batch),
        mtp_draft_vocab=a.draft_vocab), mtp=head)
    speculative.agrees = EXACT_AGREES  # greedy acceptance as built, unless forced below (patched from outside)
    if forced is not None:
        rng = random.Random(0)
        speculative.agrees = lambda target, draft: rng.random() < forced
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True).with_defaults({})
    for i in range(a.batch):
        eng.add_request(str(i), torch.randint(0, TOKEN_RANGE, (a.prompt,), generator=g).tolist(), params)
    while eng.queue:  # prefill (and the first token) outside the timed window
        eng.step()
    start_tokens, t0 = eng.stats["generated_tokens"], time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    dt = time.perf_counter() - t0
    st = eng.stats
    drafted = st.get("spec_drafted", 0)
    return {"tok_s": (st["generated_tokens"] - start_tokens) / dt,
            "acc": st.get("spec_accepted", 0) / drafted if drafted else float("nan"),
            "spec_share": st.get("spec_steps", 0) / max(1, st["steps"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model folder (default: the random 0.8B bench checkpoint)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--quantization", help="int8 / int4 weights for the target model (the head stays bf16)")
    ap.add_argument("--batch", type=int, default=1, help="concurrent requests (default 1)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request (default 64)")
    ap.add_argument("--k", default="1,2,3", help="drafts per step to try (default 1,2,3)")
    ap.add_argument("--p", default="0.5,0.6,0.7,0.8,0.9,0.95", help="forced acceptance rates")
    ap.add_argument("--draft-vocab", type=int, default=EngineConfig.mtp_draft_vocab,
                    help=f"draft over the first N token ids only (EngineConfig.mtp_draft_vocab, default "
                         f"{EngineConfig.mtp_draft_vocab}; 0 = all)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions per row (medians)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 tokens, k=2, p=0.5,0.9")
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.k, a.p = 8, "2", "0.5,0.9"
    if a.threads:
        torch.set_num_threads(a.threads)
    folder = ensure_checkpoint(a.model)
    model = load_model(folder, dtype=a.dtype, device="cpu", quantization=a.quantization)
    head = load_mtp(folder, dtype=a.dtype, device="cpu")
    if head is None:
        sys.exit(f"{folder} has no mtp.* tensors")
    ks, ps = [int(x) for x in a.k.split(",")], [float(x) for x in a.p.split(",") if x]  # --p "": real head only
    quant = " " + a.quantization if a.quantization else ""
    print(f"# MTP decode, {folder.name}, {a.dtype}{quant}, batch {a.batch}, prompt {a.prompt}, {a.tokens} tokens, "
          f"{torch.get_num_threads()} threads, draft vocab {a.draft_vocab or 'all'}")
    run(model, head, a, "on", 2, 0.5)  # warm-up (weights paged in, kernels initialised): not reported
    # Memory bandwidth drifts on these machines (±15% between runs of a few seconds): every row runs MTP
    # off, on and auto interleaved a.reps times and reports medians, speedups against that row's own off.
    print("\n| k | acceptance (forced) | measured | off tok/s | on tok/s | on speedup | auto tok/s | auto speedup "
          "| auto spec share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        for p in [None, *ps]:
            runs = {"off": [], "on": [], "auto": []}
            for _ in range(a.reps):
                runs["off"].append(run(model, head, a, "off", 1, None))
                runs["on"].append(run(model, head, a, "on", k, p))
                runs["auto"].append(run(model, head, a, "auto", k, p))
            off, on, auto = ({key: statistics.median(r[key] for r in runs[m]) for key in ("tok_s", "acc", "spec_share")}
                             for m in ("off", "on", "auto"))
            label = "real head" if p is None else f"{p:.2f}"
            print(f"| {k} | {label} | {on['acc']:.2f} | {off['tok_s']:.2f} | {on['tok_s']:.2f} | "
                  f"{on['tok_s'] / off['tok_s']:.2f}× | {auto['tok_s']:.2f} | {auto['tok_s'] / off['tok_s']:.2f}× | "
                  f"{auto['spec_share']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
