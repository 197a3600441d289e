"""Self-distil a checkpoint's MTP head so that speculative decoding sees a real acceptance rate.

Random MTP weights accept almost nothing, so tests and benchmarks train the head briefly to predict
the base model's own next-next token: the data are greedy continuations of random prompts by the base
model; for each position t the head gets (h_t, token_{t+1}) and learns token_{t+2} (teacher forcing,
cross-entropy through the frozen shared lm_head). Only `mtp.*` changes.

    python benchmarks/distill_mtp.py MODEL_DIR OUT_DIR [--steps 200] [--seqs 32] [--len 96]

writes a copy of MODEL_DIR whose `mtp.*` tensors are the trained ones. Importable: `greedy_corpus`,
`distill`, `write_with_head` (tests use them on the tiny configs; a few seconds on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltarun.cache.state import KVCache  # noqa: E402
from deltarun.model.mtp import MTPHead  # noqa: E402
from deltarun.model.qwen3_5 import Qwen3_5ForCausalLM  # noqa: E402


@torch.inference_mode()
def greedy_corpus(model: Qwen3_5ForCausalLM, n: int, prompt_len: int, total_len: int, seed: int = 0,
                  vocab: int | None = None) -> torch.Tensor:
    """[n, total_len] token ids: random prompts of prompt_len, continued greedily by `model`."""
    vocab = vocab or model.config.text.vocab_size
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (n, prompt_len), generator=g).to(model.device)
    cache = model.new_cache(n)
    logits = model.logits(model(toks, cache)[:, -1])
    out = [toks]
    for _ in range(total_len - prompt_len):
        nxt = logits[:, :vocab].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model.logits(model(nxt, cache)[:, -1])
    return torch.cat(out, 1)


def distill(model: Qwen3_5ForCausalLM, head: MTPHead, tokens: torch.Tensor, steps: int = 100,
            lr: float = 3e-3, batch: int = 8, seed: int = 0) -> list[float]:
    """Train `head` in place on `tokens` [N, L] (see module docstring); returns the loss per step."""
    with torch.inference_mode():
        hidden = model(tokens, model.new_cache(tokens.shape[0]))  # [N, L, H], final-normed
    hidden = hidden.clone()  # leave inference mode: autograd may read it
    ids, h, target = tokens[:, 1:-1].clone(), hidden[:, :-2], tokens[:, 2:].clone()
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    head.requires_grad_(True).train()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        rows = torch.randperm(ids.shape[0], generator=g)[:batch].to(ids.device)
        out = head(model, ids[rows], h[rows], pos.expand(len(rows), -1), [KVCache() for _ in rows])
        loss = F.cross_entropy(model.lm_head(out).float().flatten(0, 1), target[rows].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    head.requires_grad_(False).eval()
    return losses


def write_with_head(src: Path, dst: Path, head: MTPHead) -> Path:
    """Copy model folder `src` to `dst` with its `mtp.*` tensors replaced by `head`'s."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    new = {f"mtp.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    for path in sorted(dst.glob("*.safetensors")):
        tensors = load_file(str(path))
        if any(k.startswith("mtp.") for k in tensors):
            save_file({k: new[k].to(v.dtype) if k in new else v for k, v in tensors.items()}, str(path),
                      metadata={"format": "pt"})
    return dst


def main() -> None:
    from deltarun.weights.loader import load_model
    from deltarun.weights.mtp_loader import load_mtp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--len", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args()
    model = load_model(a.model, dtype="float32", device="cpu")
    head = load_mtp(a.model, dtype="float32", device="cpu")
    if head is None:
        sys.exit(f"{a.model} has no mtp.* tensors")
    tokens = greedy_corpus(model, a.seqs, 8, a.len)
    losses = distill(model, head, tokens, steps=a.steps, lr=a.lr)
    print(f"loss {losses[0]:.3f} → {losses[-1]:.3f}")
    print(write_with_head(Path(a.model), Path(a.out), head))


if __name__ == "__main__":
    main()
