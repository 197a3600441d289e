"""Batched next-token sampling over logits (torch only; CPU or CUDA).

Per request a :class:`SamplerState` holds the (defaulted) :class:`SamplingParams`, its random
generator and the token history the penalties need.  :func:`sample` turns a [B, V] block of
logits into one token per row, applying, in vLLM / HF order: min_tokens stop-token blocking,
repetition penalty, presence & frequency penalties, temperature (0 = greedy), top-k, top-p,
min-p.  Returned logprobs are those of the raw model distribution, as vLLM returns by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deltarun.sampling import NEUTRAL, SamplingParams

TopLogprobs = list[tuple[int, float]]


class SamplerState:
    """Sampling state of one request (one sequence).

    Call :meth:`append` with every token the request emits; :func:`sample` does not, so the
    caller decides what counts (e.g. after stop handling).  Memory: an int32 [V] count vector
    only when presence/frequency penalties are on and a bool [V] mask only when
    repetition_penalty != 1, so that per step the penalties are pure tensor ops.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
                 device: torch.device | str, eos_token_ids: Iterable[int] = ()) -> None:
        if any(getattr(params, k) is None for k in NEUTRAL):
            params = params.with_defaults({})
        self.params = params
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.num_generated = 0
        # Per-sequence constraint state (e.g. a JSON grammar matcher), see SamplingParams.logits_processors.
        self.processors = [make() for make in (params.logits_processors or [])]

        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=self.device)
            if params.seed is None:
                self.generator.seed()  # non-deterministic, like an unseeded vLLM request
            else:
                self.generator.manual_seed(params.seed)

        self.counts: Tensor | None = None  # int32 [V], output tokens only (OpenAI semantics)
        if params.presence_penalty != 0 or params.frequency_penalty != 0:
            self.counts = torch.zeros(self.vocab_size, dtype=torch.int32, device=self.device)

        self.seen: Tensor | None = None  # bool [V], prompt + output tokens (HF semantics)
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            if len(prompt_ids):
                ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)
                if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                    raise ValueError(f"prompt_ids must lie in [0, {self.vocab_size})")
                self.seen[ids.to(self.device)] = True

        # Tokens that would end the request, banned until min_tokens are out (as vLLM does);
        # EOS stays allowed when ignore_eos, since then it does not stop anything.
        block = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            block.update(int(t) for t in eos_token_ids)
        self.min_tokens_block: Tensor | None = None
        if params.min_tokens > 0 and block:
            self.min_tokens_block = torch.tensor(sorted(block), dtype=torch.long,
                                                 device=self.device)

    def append(self, token_id: int) -> None:
        """Record one generated token."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id {token_id} outside [0, {self.vocab_size})")
        self.num_generated += 1
        for p in self.processors:
            p.accept(token_id)
        if self.counts is not None:
            self.counts[token_id] += 1
        if self.seen is not None:
            self.seen[token_id] = True


@dataclass
class SampleOutput:
    """token_ids: LongTensor[B]; logprobs: float32 [B], raw-distribution logprob of each chosen
    token; top_logprobs: per row the ``params.logprobs`` most likely (id, logprob) pairs, most
    likely first ([] for rows that asked for 0 or none), or None when no row asked."""

    token_ids: Tensor
    logprobs: Tensor
    top_logprobs: list[TopLogprobs] | None


def _col(values: list[float], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _rows(x: Tensor, rows: list[int]) -> tuple[Tensor | slice, Tensor]:
    """Index and view for a row subset; a plain slice when it is every row (no gather copy)."""
    if len(rows) == x.shape[0]:
        return slice(None), x
    idx = torch.tensor(rows, dtype=torch.long, device=x.device)
    return idx, x[idx]


def process_logits(logits: Tensor, states: Sequence[SamplerState]) -> Tensor:
    """Apply every logits processor to ``logits`` [B, V] (any float dtype); returns a new
    float32 [B, V] tensor with filtered tokens at -inf; ``softmax`` of a row is the
    distribution :func:`sample` draws from.  Greedy rows get only the penalties (temperature
    and the filters do not move the argmax)."""
    B, V = logits.shape
    if len(states) != B:
        raise ValueError(f"{len(states)} states for {B} rows of logits")
    for s in states:
        if s.vocab_size != V:
            raise ValueError(f"state vocab_size {s.vocab_size} != logits width {V}")
    dev = logits.device
    x = logits.to(torch.float32, copy=True)
    neg_inf = float("-inf")

    for i, s in enumerate(states):
        for p in s.processors:  # constraints first: they bind greedy rows too
            p(x[i])
        if s.min_tokens_block is not None and s.num_generated < s.params.min_tokens:
            x[i, s.min_tokens_block] = neg_inf

    rows = [i for i, s in enumerate(states) if s.seen is not None]
    if rows:
        idx, sub = _rows(x, rows)
        rp = _col([states[i].params.repetition_penalty for i in rows], dev)
        seen = torch.stack([states[i].seen for i in rows])
        # HF semantics: shrink toward "less likely" whatever the sign of the logit.
        x[idx] = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)

    rows = [i for i, s in enumerate(states) if s.counts is not None]
    if rows:
        idx, sub = _rows(x, rows)
        freq = _col([states[i].params.frequency_penalty for i in rows], dev)
        pres = _col([states[i].params.presence_penalty for i in rows], dev)
        counts = torch.stack([states[i].counts for i in rows]).float()
        x[idx] = sub - freq * counts - pres * (counts > 0).float()

    # Greedy rows get neutral values below so that one batched pass serves every row.
    sampled = [not s.params.greedy for s in states]
    temps = [s.params.temperature if r else 1.0 for s, r in zip(states, sampled)]
    if any(t != 1.0 for t in temps):
        x /= _col(temps, dev)

    ks = [s.params.top_k if r and 0 < s.params.top_k < V else 0
          for s, r in zip(states, sampled)]
    if any(ks):
        kth = torch.topk(x, max(ks), dim=-1).values  # [B, kmax], descending
        pick = torch.tensor([max(k, 1) - 1 for k in ks], dtype=torch.long, device=dev)
        thresh = kth.gather(1, pick.unsqueeze(1))
        off = torch.tensor([k == 0 for k in ks], device=dev).unsqueeze(1)
        thresh = thresh.masked_fill(off, neg_inf)
        # "<" keeps ties at the k-th value, like HF's TopKLogitsWarper.
        x = x.masked_fill(x < thresh, neg_inf)

    ps = [s.params.top_p if r else 1.0 for s, r in zip(states, sampled)]
    if any(p < 1.0 for p in ps):
        srt, order = torch.sort(x, dim=-1, descending=False)
        cum = srt.softmax(dim=-1).cumsum(dim=-1)
        p = _col(ps, dev)
        # Drop the low tail whose total mass is <= 1 - top_p; the top token always survives.
        drop = (cum <= 1.0 - p) & (p < 1.0)
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(1, order, drop), neg_inf)

    mps = [s.params.min_p if r else 0.0 for s, r in zip(states, sampled)]
    if any(m > 0.0 for m in mps):
        probs = x.softmax(dim=-1)
        floor = _col(mps, dev) * probs.amax(dim=-1, keepdim=True)
        x = x.masked_fill(probs < floor, neg_inf)
    return x


def sample(logits: Tensor, states: Sequence[SamplerState]) -> SampleOutput:
    """Pick one token per row of ``logits`` [B, V] (any float dtype) under each row's own
    params; ``states[i]`` belongs to row i.  Sampled rows draw with their own generator, so a
    seeded request repeats exactly whatever else shares its batch."""
    raw = torch.log_softmax(logits.float(), dim=-1)  # [B, V] fp32, before any processing
    x = process_logits(logits, states)
    token_ids = x.argmax(dim=-1)
    sampled = [i for i, s in enumerate(states) if not s.params.greedy]
    if sampled:
        probs = x.softmax(dim=-1)
        for i in sampled:
            token_ids[i] = torch.multinomial(probs[i], 1, generator=states[i].generator)[0]
    chosen = raw.gather(1, token_ids.unsqueeze(1)).squeeze(1)

    top: list[TopLogprobs] | None = None
    want = [s.params.logprobs for s in states]
    if any(k is not None for k in want):
        ks = [k or 0 for k in want]
        kmax = min(max(ks), raw.shape[1])
        top = [[] for _ in states]
        if kmax > 0:
            vals, ids = torch.topk(raw, kmax, dim=-1)
            vals, ids = vals.tolist(), ids.tolist()  # one device sync for the whole batch
            for i, k in enumerate(ks):
                top[i] = list(zip(ids[i][:k], vals[i][:k]))
    return SampleOutput(token_ids=token_ids, logprobs=chosen, top_logprobs=top)


def prompt_logprobs(logits: Tensor, next_ids: Tensor, k: int) -> tuple[Tensor, list[TopLogprobs]]:
    """Logprobs of a prompt's tokens: ``logits`` [T, V] are the model outputs at positions
    0..T-1 and ``next_ids`` [T] the tokens that follow each.  Returns float32 [T] logprob of
    each next token and per position the top ``k`` (id, logprob) pairs ([] when k == 0).
    Works in fp32, so it allocates T x V floats: callers pass chunks of the prompt."""
    if logits.dim() != 2 or next_ids.shape != logits.shape[:1]:
        raise ValueError(f"need logits [T, V] and next_ids [T], got {tuple(logits.shape)} "
                         f"and {tuple(next_ids.shape)}")
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, next_ids.to(lp.device, torch.long).unsqueeze(1)).squeeze(1)
    k = min(int(k), lp.shape[1])
    if k <= 0:
        return chosen, [[] for _ in range(lp.shape[0])]
    vals, ids = torch.topk(lp, k, dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
