"""Speculative decoding with the model's own MTP head: draft k tokens, verify them in one forward.

Per decode step: (1) the MTP head catches up on the target hidden states it has not seen (paired with
the tokens that follow them) and drafts k tokens; (2) ONE target forward runs every row over [last
token, drafts…] (shorter rows padded, their extra positions discarded) while each DeltaNet layer records
its state after every position (`ModelCache.capture`); (3) positions are accepted left to right: greedy
rows keep a draft while it is the target's pick, sampled rows by rejection sampling (`rejection_step`),
so the output is exactly the target's distribution. Each position's distribution is computed after the
previous token was appended to the sampler, so penalties, min_tokens and logits processors stay exact.
Each row's DeltaNet conv/recurrent state is then reset to the one after its last kept position and its
KV cut there: the state equals a plain run's. Nothing past a stop/EOS/max_tokens is ever emitted.

The head's context (`DraftState`, cache/state.py, on the `SeqState`: freed, preempted and forked with it) is its own KV
of pairs (h_t, token t+1); after a prefix-cache hit it starts at the hit (no MTP state is cached), which
may only lower acceptance. Not drafted (0 drafts, sampled exactly as plain decoding): image/video
requests, requests with logits processors (the grammar cannot advance over unverified drafts), and
under `mtp="auto"` seeded sampled requests (their output must not depend on the timing-driven switch).
`SpecPolicy` (spec_policy.py) decides per step whether to speculate; a batch with nothing to draft
decodes plainly.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..cache.state import DraftState, KVCache, ModelCache, SeqState
from ..inputs import SeqUpdate, StepOutput
from ..model.mtp import MTPHead
from ..ops import routes
from ..ops.linear import Linear
from ..ops.quant import QuantLinear
from ..ops.sampling import draw, process_logits, sample
from .sequence import Sequence
from .spec_policy import SpecPolicy, rejection_step

if TYPE_CHECKING:
    from .sequence import DecodeHost


class Speculator:
    def __init__(self, engine: "DecodeHost", head: MTPHead, mode: str, k: int, draft_vocab: int = 0):
        self.engine, self.head, self.k = engine, head, k
        self.policy = SpecPolicy(mode)
        self.draft_head = _draft_head(engine.model.lm_head, draft_vocab)
        engine.stats.update({"spec_steps": 0, "spec_drafted": 0, "spec_accepted": 0})

    # -- keeping the head's context --------------------------------------------------------------
    def _eligible(self, seq: Sequence) -> bool:
        p = seq.request.params
        # auto switches by timing: a seeded sampled request must not depend on it, so it never drafts
        seeded = self.policy.mode == "auto" and p.seed is not None and not p.greedy
        return seq.request.mm is None and not p.logits_processors and not seeded

    def on_prefill(self, seq: Sequence, hidden: torch.Tensor, start: int) -> None:
        """hidden [T, H]: the target's output for inputs start … start+T−1 of `seq` (a prefill chunk)."""
        if not self._eligible(seq):
            return
        state = seq.held_state
        d = state.draft
        if d is None or d.pos + (0 if d.hidden is None else d.hidden.shape[0]) != start:
            d = state.draft = DraftState(KVCache(), start)  # a prefix hit or a gap: start afresh here
        d.hidden = hidden if d.hidden is None else torch.cat([d.hidden, hidden])
        self._flush([seq], keep=1)  # the last row's next token may not exist yet (it is sampled next)

    def _flush(self, seqs: list[Sequence], keep: int) -> torch.Tensor | None:
        """Feed all but `keep` pending rows of each sequence (all hold as many) to the head in one batch;
        returns its output for them [G, P−keep, H]."""
        ds = [_context(s) for s in seqs]
        hs = [_pending(d) for d in ds]
        n = hs[0].shape[0] - keep
        if n <= 0:
            return None
        dev = hs[0].device
        ids = torch.tensor([s.inputs[d.pos + 1 : d.pos + 1 + n] for s, d in zip(seqs, ds)], device=dev)
        pos = torch.tensor([list(range(d.pos, d.pos + n)) for d in ds], device=dev)
        out = self.head(self.engine.model, ids, torch.stack([h[:n] for h in hs]), pos, [d.kv for d in ds])
        for d, h in zip(ds, hs):
            d.hidden, d.pos = h[n:].clone(), d.pos + n  # a copy: do not pin the whole chunk
        return out

    def fork(self, parent: Sequence, child: Sequence) -> None:
        if (d := parent.held_state.draft) is not None:
            child.held_state.draft = cd = DraftState(KVCache(), d.pos, _pending(d).clone())
            cd.kv.copy_prefix(d.kv, d.kv.length)

    # -- one decode step ---------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence], outputs: dict[str, StepOutput]) -> None:
        eng, t0 = self.engine, time.perf_counter()
        if not any(self._eligible(s) for s in seqs) or not self.policy.speculate():
            # no speculation now (auto found plain cheaper, or nothing to draft): its verify scratch (~0.9 GB at
            # 16 rows of the 0.8B) is not held through the thousands of steps until the next probe
            eng.pool.drop_verify_buffers()
            eng.plain_decode(seqs, outputs)
            self.policy.record(False, time.perf_counter() - t0, len(seqs))
            return
        budgets = [self._budget(s) for s in seqs]
        drafts, qs = self._draft(seqs, budgets)
        emitted = self._verify(seqs, drafts, qs, outputs)
        self.policy.record(True, time.perf_counter() - t0, emitted, len(seqs))

    def _budget(self, seq: Sequence) -> int:
        """Drafts worth making for `seq`: never more than it may still emit minus the bonus token."""
        d = seq.held_state.draft
        if d is None or d.hidden is None or not self._eligible(seq) or d.pos + d.hidden.shape[0] != seq.num_computed:
            return 0  # no fresh context (first step after a plain step or a prefix restore): resyncs now
        p = seq.request.params
        left = seq.request.max_len - seq.num_inputs
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - len(seq.token_ids))
        return max(0, min(self.k, left - 1))

    @torch.inference_mode()
    def _draft(self, seqs: list[Sequence], budgets: list[int]) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """Draft budgets[b] tokens per row; returns the tokens and, for sampled rows, each draft's q [V]."""
        eng = self.engine
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        rows = [b for b, n in enumerate(budgets) if n > 0]
        if not rows:
            return drafts, qs
        last: dict[int, torch.Tensor] = {}  # row → head output [H] of its newest pair
        keep: dict[int, int] = {}
        groups: dict[int, list[int]] = {}  # step 1: catch up on the pending pairs, batched by their count
        for b in rows:
            groups.setdefault(_pending(_context(seqs[b])).shape[0], []).append(b)
        for group in groups.values():
            out = self._flush([seqs[b] for b in group], keep=0)
            assert out is not None  # keep=0, and a row with a budget has ≥ 1 pending pair
            for i, b in enumerate(group):
                last[b] = out[i, -1]
                keep[b] = _context(seqs[b]).kv.length  # entries past this come from drafts: dropped below
        for j in range(max(budgets)):
            live = [b for b in rows if budgets[b] > j]
            toks = self._pick(torch.stack([last[b] for b in live]), [seqs[b] for b in live], [qs[b] for b in live])
            for b, t in zip(live, toks):
                drafts[b].append(t)
            live = [b for b in live if budgets[b] > j + 1]
            if not live:
                break
            dev = eng.model.device
            ids = torch.tensor([[drafts[b][-1]] for b in live], device=dev)
            pos = torch.tensor([[seqs[b].num_computed + j] for b in live], device=dev)
            out = self.head(eng.model, ids, torch.stack([last[b] for b in live])[:, None], pos,
                            [_context(seqs[b]).kv for b in live], step=j + 1)
            for i, b in enumerate(live):
                last[b] = out[i, 0]
        for b in rows:
            _context(seqs[b]).kv.length = keep[b]
        return drafts, qs

    def _pick(self, h: torch.Tensor, seqs: list[Sequence], qs: list[list[torch.Tensor]]) -> list[int]:
        """Draft one token per row from the head's output h [R, H]: argmax for greedy rows, a sample of q
        (the request's own temperature/top-k/top-p/penalties at the step's start) for sampled rows. Logits
        exist only for the draft vocabulary when there is one; rows that need no logits processing (plain
        greedy) take the argmax there directly, the others see −inf past it."""
        head, valid = self.draft_head or self.engine.model.lm_head, self.engine.valid_vocab
        part = head(h)  # [R, V or the draft vocabulary]
        if all(s.sampler.plain_greedy() for s in seqs):
            return part[:, :valid].argmax(-1).tolist()
        x = part.new_full((h.shape[0], self.engine.model.config.text.vocab_size), float("-inf"), dtype=torch.float32)
        x[:, : part.shape[1]] = part
        x = process_logits(x, [s.sampler for s in seqs])
        x[:, valid:] = float("-inf")
        toks = x.argmax(-1).tolist()
        for i, s in enumerate(seqs):
            if not s.request.params.greedy:
                q = x[i].softmax(-1)
                toks[i] = draw(q, s.sampler.generator)
                qs[i].append(q)
        return toks

    @torch.inference_mode()
    def _verify(self, seqs: list[Sequence], drafts: list[list[int]], qs: list[list[torch.Tensor]],
                outputs: dict[str, StepOutput]) -> int:
        eng, dev, pool = self.engine, self.engine.model.device, self.engine.pool
        t = 1 + max(len(d) for d in drafts)
        ids = torch.tensor([[s.token_ids[-1], *d] + [s.token_ids[-1]] * (t - 1 - len(d))
                            for s, d in zip(seqs, drafts)], device=dev)  # padding is discarded below
        positions = None
        if any(s.request.mm is not None for s in seqs):
            pos = [s.num_computed + (s.request.mm.delta if s.request.mm is not None else 0) for s in seqs]
            positions = (torch.tensor(pos, device=dev)[:, None] + torch.arange(t, device=dev)).expand(3, -1, -1)
        states = [s.held_state for s in seqs]
        capture: dict = {}
        hidden = eng.run_model(seqs, ids, ModelCache(pool, states, capture=capture), positions=positions)  # [B, T, H]
        logits = eng.model.logits(hidden)  # [B, T, V]
        p0 = [s.num_computed for s in seqs]
        accepted = [self._accept(s, logits[b], drafts[b], qs[b], outputs) for b, s in enumerate(seqs)]
        self._rewind(seqs, states, capture, accepted, t)
        for b, (s, a) in enumerate(zip(seqs, accepted)):
            if s.state is None or s.finished or not self._eligible(s):
                continue  # a finished row is freed after this step
            d = s.state.draft = s.state.draft or DraftState(KVCache(), p0[b])
            new = hidden[b, : a + 1].clone()  # H_0 … H_a: they pair with the tokens just emitted
            if d.hidden is not None and d.hidden.shape[0] and d.pos + d.hidden.shape[0] == p0[b]:
                d.hidden = torch.cat([d.hidden, new])  # undrafted row (budget 0) with a valid context
            else:
                d.pos, d.hidden = p0[b], new  # drafted (all fed to the head) or resynchronising
        for key, n in (("spec_steps", 1), ("spec_drafted", sum(map(len, drafts))), ("spec_accepted", sum(accepted))):
            eng.stats[key] += n
        return sum(a + 1 for a in accepted)

    def _accept(self, seq: Sequence, logits: torch.Tensor, draft: list[int], q: list[torch.Tensor],
                outputs: dict[str, StepOutput]) -> int:
        """Emit tokens for one row from its verify logits [T, V]; returns how many drafts it accepted."""
        eng, sampler, greedy, want = self.engine, seq.sampler, seq.request.params.greedy, seq.request.params.logprobs
        update = SeqUpdate(seq.index, [], [], [])
        n = 0
        for i in range(len(draft) + 1):
            if i == len(draft):  # no draft here: exactly the plain decoder's sampling (same RNG use)
                r = sample(logits[i : i + 1], [sampler], vocab_limit=eng.valid_vocab)
                tok, ok = int(r.token_ids[0]), False
                lp, top = float(r.logprobs[0]), (r.top_logprobs[0] if r.top_logprobs is not None else [])
            else:
                if sampler.plain_greedy():  # the bare argmax: no [V] copy for logits processing
                    tok = int(logits[i, : eng.valid_vocab].argmax())
                    ok = agrees(tok, draft[i])
                else:
                    x = process_logits(logits[i : i + 1], [sampler])[0]
                    x[eng.valid_vocab :] = float("-inf")
                    if greedy:
                        tok = int(x.argmax())
                        ok = agrees(tok, draft[i])
                    else:
                        tok, ok = rejection_step(x.softmax(-1), q[i], draft[i], sampler.generator)
                tok = draft[i] if ok else tok
                lse = torch.logsumexp(logits[i], -1)
                lp, top = float(logits[i, tok] - lse), []
                if want is not None and want > 0:
                    vals, ids = torch.topk(logits[i], min(want, logits.shape[-1]))
                    top = list(zip(ids.tolist(), (vals - lse).tolist()))
            for toks, lps, tops in ((update.new_token_ids, update.new_logprobs, update.new_top_logprobs),
                                    (seq.token_ids, seq.logprobs, seq.top_logprobs)):
                toks.append(tok)
                lps.append(lp)
                tops.append(top)
            sampler.append(tok)
            eng.stats["generated_tokens"] += 1
            eng.check_stop(seq, tok)
            if seq.finished or not ok:
                break
            n += 1
        update.finish_reason, update.stop_reason = seq.finish_reason, seq.stop_reason
        req = seq.request
        outputs.setdefault(req.request_id, StepOutput(req.request_id, [])).updates.append(update)
        return n

    def _rewind(self, seqs: list[Sequence], states: list[SeqState], capture: dict, accepted: list[int], t: int) -> None:
        """Set each live row's DeltaNet states to those after its last kept position; cut its KV there."""
        live = [s.state is not None and not s.finished for s in seqs]  # finished rows are freed after the step
        pool, rows = self.engine.pool, [b for b, s in enumerate(seqs) if live[b] and accepted[b] < t - 1]
        for b, s in enumerate(seqs):
            if live[b]:
                keep = accepted[b] + 1
                s.num_computed += keep
                s.held_state.length += keep - t
                for c in s.held_state.kv:
                    c.length += keep - t
        if not rows:
            return
        dev = pool.conv[0].device if pool.conv else None
        idx = torch.tensor(rows, device=dev)
        last = torch.tensor([accepted[b] for b in rows], device=dev)  # position index kept, 0 … t−2
        slots = torch.tensor([states[b].slot for b in rows], device=dev)
        for layer, (window, rec) in capture.items():
            w = window[idx]  # [R, C, K−1+T]
            k1 = pool.conv[layer].shape[-1]
            cols = (last[:, None] + 1 + torch.arange(k1, device=dev))[:, None, :].expand(-1, w.shape[1], -1)
            pool.conv[layer].index_copy_(0, slots, w.gather(2, cols))
            for b in rows:  # rec [T−1, B, …]: states after positions 0 … T−2 (verify_buffer)
                pool.recurrent[layer][states[b].slot].copy_(rec[accepted[b], b])


def _context(seq: Sequence) -> DraftState:
    """The MTP head's context of `seq`, which has one where this is called (an eligible sequence gets it with
    its first prefill chunk; a row drafts only with a fresh one)."""
    d = seq.held_state.draft
    assert d is not None, "no MTP context"
    return d


def _pending(d: DraftState) -> torch.Tensor:
    """The target rows [P, H] `d` has not fed to the head: set with the context (on_prefill, _verify) and
    only ever replaced by a tensor."""
    assert d.hidden is not None, "an MTP context without its pending rows"
    return d.hidden


def agrees(target: int, draft: int) -> bool:
    """Greedy acceptance: a draft is kept while it is the target's own pick."""
    return target == draft


def make_speculator(engine: "DecodeHost", head: MTPHead | None, cfg) -> Speculator | None:
    """The engine's speculator for `cfg.mtp` / `cfg.num_speculative_tokens`, or None (plain decoding)."""
    SpecPolicy(cfg.mtp)  # validates the mode
    if cfg.num_speculative_tokens < 0:
        raise ValueError(f"num_speculative_tokens must be >= 0, got {cfg.num_speculative_tokens}")
    if cfg.mtp_draft_vocab < 0:
        raise ValueError(f"mtp_draft_vocab must be >= 0 (0 = the whole vocabulary), got {cfg.mtp_draft_vocab}")
    if cfg.mtp == "off" or (head is None and cfg.mtp == "auto"):
        return None
    if head is None:
        raise ValueError("mtp='on' but this checkpoint has no MTP head (no mtp.* tensors): use mtp='auto' or 'off'")
    k = cfg.num_speculative_tokens
    return Speculator(engine, head, cfg.mtp, k, cfg.mtp_draft_vocab) if k > 0 else None


def _draft_head(lm_head: Linear | QuantLinear, n: int) -> torch.nn.Module | None:
    """The lm_head's first n rows as a Linear of their own, or None (draft over the whole vocabulary).
    BPE ids are merge-ranked, frequent tokens first: with the real tokenizer the first 32K ids cover
    92–94% of English prose and code tokens (benchmarks/ docs), and each draft step reads n rows instead of
    all 248K (a third of the 0.8B's weights). Drafts outside them are simply never proposed."""
    if not 0 < n < lm_head.out_features:
        return None
    if isinstance(lm_head, QuantLinear):
        if (rows := lm_head.first_rows(n)) is not None:  # the packed rows themselves: no copy, no re-quantizing
            return rows
        # elsewhere re-quantized from its own values: drafts need not be bit-exact
        w = lm_head.row_block(0, n).to(lm_head.dtype)
        quant = QuantLinear.from_float(w, lm_head.bits, lm_head.group_size, lm_head.dtype).to(w.device)
        quant.pack()
        return quant
    head = Linear(lm_head.in_features, n, bias=False, device="meta")
    head.weight = torch.nn.Parameter(lm_head.weight[:n], requires_grad=False)  # a view: no copy
    routes.assign(head)  # the routes the lm_head's own rows take here
    return head
