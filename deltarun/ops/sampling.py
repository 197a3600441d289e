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
from typing import TypeVar

import torch
from torch import Tensor

from deltarun.sampling import NEUTRAL, SamplingParams

TopLogprobs = list[tuple[int, float]]
# a logit's cap after the repetition penalty (times 1 / GREEDY_EPS it is still finite in fp32), and the cap of
# the penalty and the temperature themselves (past 3e38 they would be inf in fp32, and 0 * inf a NaN)
MAX_PENALIZED = 1e30
RACE_MAX = 16384  # candidates up to this many: drawn by torch.multinomial's race (`draw`)
MAX_FAST_K = 1024  # top-k up to this many: sampled from the k best tokens alone (`top_k_candidates`)

_T = TypeVar("_T")


def _filled(value: _T | None) -> _T:
    """A sampling knob of a :class:`SamplerState`'s params, which ``with_defaults`` left set."""
    assert value is not None
    return value


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

        # Penalty state is sparse (only the ids seen), so a step costs O(ids seen), not O(vocab).
        self.counts: dict[int, int] | None = None  # output tokens only (OpenAI semantics)
        if params.presence_penalty != 0 or params.frequency_penalty != 0:
            self.counts = {}
        self.seen: set[int] | None = None  # prompt + output tokens (HF semantics)
        if params.repetition_penalty != 1:
            self.seen = {int(t) for t in prompt_ids}
            if self.seen and (min(self.seen) < 0 or max(self.seen) >= self.vocab_size):
                raise ValueError(f"prompt_ids must lie in [0, {self.vocab_size})")
        self._seen_ids: Tensor | None = None
        self._count_ids: tuple[Tensor, Tensor] | None = None

        # Tokens that would end the request, banned until min_tokens are out (as vLLM does);
        # EOS stays allowed when ignore_eos, since then it does not stop anything.
        block = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            block.update(int(t) for t in eos_token_ids)
        self.min_tokens_block: Tensor | None = None
        if params.min_tokens > 0 and block:
            self.min_tokens_block = torch.tensor(sorted(block), dtype=torch.long,
                                                 device=self.device)

    def plain_greedy(self) -> bool:
        """True when this row's pick is the bare argmax of the logits (greedy, no penalty, processor or
        min_tokens ban in force): `process_logits` would change nothing."""
        return (self.params.greedy and not self.processors and self.seen is None and self.counts is None
                and (self.min_tokens_block is None or self.num_generated >= self.params.min_tokens))

    def append(self, token_id: int) -> None:
        """Record one generated token."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id {token_id} outside [0, {self.vocab_size})")
        self.num_generated += 1
        for p in self.processors:
            p.accept(token_id)
        if self.counts is not None:
            self.counts[token_id] = self.counts.get(token_id, 0) + 1
            self._count_ids = None
        if self.seen is not None and token_id not in self.seen:
            self.seen.add(token_id)
            self._seen_ids = None

    def seen_ids(self) -> Tensor:
        if self._seen_ids is None:
            assert self.seen is not None
            self._seen_ids = torch.tensor(sorted(self.seen), dtype=torch.long, device=self.device)
        return self._seen_ids

    def count_ids(self) -> tuple[Tensor, Tensor]:
        """(ids, counts as float32) of the generated tokens."""
        if self._count_ids is None:
            counts = self.counts
            assert counts is not None
            ids = sorted(counts)
            self._count_ids = (torch.tensor(ids, dtype=torch.long, device=self.device),
                               torch.tensor([counts[i] for i in ids], dtype=torch.float32,
                                            device=self.device))
        return self._count_ids


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


def _penalize_(x: Tensor, s: SamplerState) -> None:
    """A row x [V] fp32 in place: the min_tokens ban, the repetition penalty, presence and frequency penalties."""
    if s.min_tokens_block is not None and s.num_generated < s.params.min_tokens:
        x[s.min_tokens_block] = float("-inf")
    if s.seen:
        # within [1 / MAX_PENALIZED, MAX_PENALIZED]: in fp32 a smaller one is 0 and a larger one inf, and a
        # token masked to -inf (a grammar) times 0 is NaN, a 0 logit times inf too
        rp = min(max(_filled(s.params.repetition_penalty), 1 / MAX_PENALIZED), MAX_PENALIZED)
        ids = s.seen_ids()
        v = x[ids]
        # HF semantics: shrink toward "less likely" whatever the sign of the logit. A penalty near 0
        # (5e-324 is valid) would make v / rp inf, and several infs a NaN softmax: cap the logit at a
        # value that stays finite after dividing by any sampled temperature (>= GREEDY_EPS).
        x[ids] = torch.where(v > 0, v / rp, v * rp).clamp_(max=MAX_PENALIZED)
    if s.counts:
        ids, counts = s.count_ids()
        x[ids] -= _filled(s.params.frequency_penalty) * counts + _filled(s.params.presence_penalty)


def _f32(v: float, like: Tensor) -> Tensor:
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def top_k_candidates(row: Tensor, s: SamplerState) -> tuple[Tensor, Tensor] | None:
    """A sampled row's distribution when it has a top-k (the model cards' settings: k = 20), from its k best
    tokens only: (probabilities, token ids) of the tokens that survive temperature, top-k, top-p and min-p —
    `process_logits` with its filters in the same order and the same fp32 operations, then softmax, restricted
    to the tokens it leaves finite. `row` [V] fp32: the raw logits, penalised (`_penalize_`) by the caller.
    Each filter on [V] was a pass over 248K values (plus a scatter of the sorted ones back): ~2.7 ms a row, 50 ms
    for 16 rows, of which this keeps one top-k. None where the full path must decide: a tie at the k-th value
    (the HF warper keeps every tied token), or fewer than k finite logits."""
    k = _filled(s.params.top_k)
    vals, ids = torch.topk(row, k + 1)
    if not bool(torch.isfinite(vals[:k]).all()) or bool(vals[k] == vals[k - 1]):
        return None
    vals, ids = vals[:k], ids[:k]  # descending
    t = min(_filled(s.params.temperature), MAX_PENALIZED)
    if t != 1.0:
        vals = vals / _f32(t, vals)
    p = _filled(s.params.top_p)
    if p < 1.0:
        cum = vals.flip(0).softmax(0).cumsum(0)  # ascending, as process_logits sorts
        drop = cum <= 1.0 - _f32(p, vals)
        drop[-1] = False
        keep = ~drop.flip(0)
        vals, ids = vals[keep], ids[keep]
    mp = _filled(s.params.min_p)
    if mp > 0.0:
        probs = vals.softmax(0)
        keep = ~(probs < _f32(mp, vals) * probs.amax())
        vals, ids = vals[keep], ids[keep]
    return vals.softmax(0), ids


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
        _penalize_(x[i], s)

    # Greedy rows get neutral values below so that one batched pass serves every row.
    sampled = [not s.params.greedy for s in states]
    # a temperature past fp32's range (1e300 is valid) would be inf, and -inf / inf a NaN: 1e30 is as flat
    temps = [min(_filled(s.params.temperature), MAX_PENALIZED) if r else 1.0 for s, r in zip(states, sampled)]
    if any(t != 1.0 for t in temps):
        x /= _col(temps, dev)

    ks = [k if r and 0 < k < V else 0
          for k, r in zip((_filled(s.params.top_k) for s in states), sampled)]
    if any(ks):
        kth = torch.topk(x, max(ks), dim=-1).values  # [B, kmax], descending
        pick = torch.tensor([max(k, 1) - 1 for k in ks], dtype=torch.long, device=dev)
        thresh = kth.gather(1, pick.unsqueeze(1))
        off = torch.tensor([k == 0 for k in ks], device=dev).unsqueeze(1)
        thresh = thresh.masked_fill(off, neg_inf)
        # "<" keeps ties at the k-th value, like HF's TopKLogitsWarper.
        x = x.masked_fill(x < thresh, neg_inf)

    ps = [_filled(s.params.top_p) if r else 1.0 for s, r in zip(states, sampled)]
    if any(p < 1.0 for p in ps):
        # After top-k only a few tokens are finite: sort those, not the whole vocabulary.
        m = int(torch.isfinite(x).sum(dim=-1).max()) if any(ks) else V
        if m < V // 8:
            srt, order = torch.topk(x, m, dim=-1, sorted=True)
            srt, order = srt.flip(-1), order.flip(-1)  # ascending, like the full sort
        else:
            srt, order = torch.sort(x, dim=-1, descending=False)
        cum = srt.softmax(dim=-1).cumsum(dim=-1)
        p = _col(ps, dev)
        # Drop the low tail whose total mass is <= 1 - top_p; the top token always survives.
        drop = (cum <= 1.0 - p) & (p < 1.0)
        drop[:, -1] = False
        x[:, :] = x.scatter(1, order, srt.masked_fill(drop, neg_inf))

    mps = [_filled(s.params.min_p) if r else 0.0 for s, r in zip(states, sampled)]
    if any(m > 0.0 for m in mps):
        probs = x.softmax(dim=-1)
        floor = _col(mps, dev) * probs.amax(dim=-1, keepdim=True)
        x = x.masked_fill(probs < floor, neg_inf)
    return x


def draw(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """One index of ``probs`` [V] (≥ 0, any scale, not all 0) drawn with probability probs[i] / Σprobs; an entry
    of 0 is never drawn. Up to RACE_MAX entries by ``torch.multinomial`` (a race of one exponential number per
    entry: a seeded draw moves only when the top two racers nearly tie, so logits that differ in their last bits
    between batch compositions still give the same token); a whole 248K vocabulary by `inverse_cdf`, since the
    race costs ~5 ms there, a quarter of an int4 0.8B decode step."""
    if probs.numel() <= RACE_MAX:
        return int(torch.multinomial(probs, 1, generator=generator)[0])
    return inverse_cdf(probs, generator)


def inverse_cdf(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """`draw` by inverting the fp64 cumulative sum at one uniform number: ~0.3 ms for 248K entries."""
    cdf = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True)[0])
    if i >= probs.numel() or not probs[i] > 0:  # u rounded onto the total: the last entry that can be drawn
        i = int(torch.nonzero(probs > 0)[-1, 0])
    return i


def sample(logits: Tensor, states: Sequence[SamplerState], vocab_limit: int | None = None) -> SampleOutput:
    """Pick one token per row of ``logits`` [B, V] (any float dtype) under each row's own
    params; ``states[i]`` belongs to row i.  Sampled rows draw with their own generator, so a
    seeded request repeats exactly whatever else shares its batch, as long as its logits do (see `draw` for
    logits that differ in their last bits).  Ids >= ``vocab_limit`` (the
    embedding's padding rows, which no tokenizer knows) are never drawn; reported logprobs stay
    those of the model's full distribution, as the reference computes them."""
    lf = logits.float()  # once: a [B, 248K] copy costs ~0.5 ms a token on a laptop-class CPU
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)  # log-probs = logits - lse (raw model)
    if len(states) == lf.shape[0] and all(s.plain_greedy() and s.vocab_size == lf.shape[1] for s in states):
        # nothing to apply: no processed [B, V] copy
        token_ids = lf[:, :vocab_limit].argmax(dim=-1)
    else:
        B, V = lf.shape
        if len(states) != B:
            raise ValueError(f"{len(states)} states for {B} rows of logits")
        width = V if vocab_limit is None else min(V, vocab_limit)
        token_ids = torch.zeros(B, dtype=torch.long, device=lf.device)
        rest = []
        for i, s in enumerate(states):  # rows with a top-k: from their k best tokens (`top_k_candidates`)
            cand = None
            if (not s.params.greedy and not s.processors and s.vocab_size == V
                    and 0 < _filled(s.params.top_k) <= min(V // 8, MAX_FAST_K, width - 1)):
                row = lf[i]
                if s.seen or s.counts or (s.min_tokens_block is not None and s.num_generated < s.params.min_tokens):
                    row = row.clone()
                    _penalize_(row, s)
                row = row[:vocab_limit]  # the padding ids past vocab_limit never compete
                cand = top_k_candidates(row, s)
            if cand is None:
                rest.append(i)
            else:
                token_ids[i] = cand[1][draw(cand[0], s.generator)]
        if rest:
            sub = logits if len(rest) == B else logits[rest]
            x = process_logits(sub, [states[i] for i in rest])
            if vocab_limit is not None and vocab_limit < x.shape[1]:
                x[:, vocab_limit:] = float("-inf")
            token_ids[rest] = x.argmax(dim=-1)
            # Filters usually leave a handful of candidates: draw among those, not the whole vocabulary.
            # Decided per row, so that a row's draw never depends on what else shares the batch.
            finite = torch.isfinite(x).sum(dim=-1).tolist()
            for j, i in enumerate(rest):
                if states[i].params.greedy:
                    continue
                if finite[j] < x.shape[1] // 8:
                    vals, cand_ids = torch.topk(x[j], finite[j])
                    token_ids[i] = cand_ids[draw(vals.softmax(dim=-1), states[i].generator)]
                else:
                    token_ids[i] = draw(x[j].softmax(dim=-1), states[i].generator)
    chosen = (lf.gather(1, token_ids.unsqueeze(1)) - lse).squeeze(1)

    top: list[TopLogprobs] | None = None
    want = [s.params.logprobs for s in states]
    if any(k is not None for k in want):
        ks = [k or 0 for k in want]
        kmax = min(max(ks), logits.shape[1])
        top = [[] for _ in states]
        if kmax > 0:
            top_vals, top_ids = torch.topk(lf, kmax, dim=-1)
            top_vals = top_vals - lse
            lp_rows, id_rows = top_vals.tolist(), top_ids.tolist()  # one device sync for the whole batch
            for i, k in enumerate(ks):
                top[i] = list(zip(id_rows[i][:k], lp_rows[i][:k]))
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
