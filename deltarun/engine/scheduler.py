"""Which sequences run in a step, and the bookkeeping around it: pure Python over token ids and byte counts.

The scheduler owns the requests, the waiting queue (sequences needing prefill, oldest first; preempted ones
go back to the front) and the running set (sequences holding a state slot). Per step the engine asks it for
the decode batch (`schedule_decode`: every running sequence with one pending input, after preempting the
newest request while the batch's KV growth would exceed the memory budget) and then for the prefill chunks
(`schedule_prefill`: admission by free slots and memory, chunk bounds on prefix-cache block boundaries,
up to `max_prefill_tokens` in all, run as one packed forward).
After each phase `reap` frees the sequences that finished. Stops (`check_stop`) are decided here too.
It touches no tensor: the state pool is used only for its slot bookkeeping, and a newly admitted
sequence's state is made by the runner through the `start` callback.

Which waiting sequence gets the next chunk is one function, `pick_prefill`: waiting prompts take turns,
one chunk each (a sequence that got a chunk goes to the back of the queue), so a short prompt's first token
waits for at most one chunk of every prompt ahead of it, never for a long prompt's whole prefill. New
sequences are admitted in arrival order only (a large prompt waiting for room is not overtaken by later
admissions), while sequences that already hold state keep taking turns. A step's prefill takes chunks in
that order until the token budget is spent: many short prompts arriving together (a server's clients)
prefill in one forward, not one per step. Chunks of images/videos prompts run alone, and one forward
holds one adapter.
"""
from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..cache.state import grown_capacity
from .sequence import Request, Sequence


class SlotPool(Protocol):
    """The slot bookkeeping of cache.state.StatePool."""

    free_slots: list[int]
    num_slots: int

    def release(self, slot: int) -> None: ...

    def slot_nbytes(self) -> int: ...


@dataclass
class Memory:
    """The byte budget running sequences share, and what one token of KV costs."""

    budget: int  # bytes for running sequences' KV + DeltaNet slots (+ MTP context)
    kv_token_bytes: int  # one token's keys and values over all full-attention layers
    kv_layers: int  # full-attention layers (KV grows per layer)


@dataclass
class Chunk:
    """One prefill chunk: inputs start … end−1 of `seq`; `target` = inputs to compute before sampling."""

    seq: Sequence
    start: int
    end: int
    target: int

    @property
    def last(self) -> bool:
        return self.end == self.target


def pick_prefill(waiting: Iterable[Sequence], admit: Callable[[Sequence], bool],
                 eligible: Callable[[Sequence], bool] = lambda seq: True) -> Sequence | None:
    """The scheduling policy: the first waiting sequence that holds state, or that `admit` lets in; only the
    oldest `eligible` sequence without state is offered to `admit` (admission stays in arrival order; one
    that is not eligible now, its adapter not fitting beside the running ones, is passed over)."""
    offered = False
    for seq in waiting:
        if seq.state is not None:
            return seq
        if not offered and eligible(seq):
            offered = True
            if admit(seq):
                return seq
    return None


def packs_with(first: Sequence, seq: Sequence) -> bool:
    """Whether `seq`'s chunk may join `first`'s in one packed forward: text only, the same adapter."""
    return first.request.mm is None and seq.request.mm is None and seq.request.adapter == first.request.adapter


def chunk_end(start: int, target: int, max_tokens: int, block: int) -> int:
    """Where a chunk from `start` ends: ≤ max_tokens on, and on block boundaries where it can (the prefix
    cache snapshots there), with one snapshot point at the last boundary before the prompt's end."""
    end = min(start + max_tokens, target)
    if end < target and end // block * block > start:
        end = end // block * block
    if start < target // block * block < end:
        end = target // block * block
    return end


class Scheduler:
    def __init__(self, pool: SlotPool, memory: Memory, *, max_prefill_tokens: int, block: int, lookahead: int,
                 eos_token_ids: list[int], start: Callable[[Sequence], None], stats: dict,
                 admissible: Callable[[str | None, set[str | None]], bool] = lambda name, running: True):
        self.pool, self.memory, self.stats = pool, memory, stats
        self.max_prefill_tokens, self.block = max_prefill_tokens, block
        self.lookahead = lookahead  # KV positions one decode step may add per sequence (1 + MTP drafts)
        self.eos_token_ids = list(eos_token_ids)
        self.start = start  # the runner's: give an admitted sequence its state (and any cached prefix)
        self.admissible = admissible  # engine/adapters.py's: whether an adapter fits beside the running ones
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._arrivals = itertools.count()

    def next_arrival(self) -> int:
        return next(self._arrivals)

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.extend(req.seqs)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        for seq in req.seqs if req else []:
            if not seq.finished:
                seq.finish_reason = "abort"
            self.drop(seq)

    def finish(self, request_id: str, index: int, reason: str, stop_reason: int | str | None = None) -> None:
        req = self.requests.get(request_id)
        if req is None or index >= len(req.seqs):
            return
        seq = req.seqs[index]
        if not seq.finished:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.drop(seq)
        if req.finished:
            self.requests.pop(request_id, None)

    # -- decode -----------------------------------------------------------------------------------
    def schedule_decode(self) -> list[Sequence]:
        """The running sequences ready to decode, after preempting the newest requests while the batch's
        KV growth would exceed the memory budget (a request alone always runs)."""
        per_layer = self.memory.kv_token_bytes // max(1, self.memory.kv_layers)
        step = self.lookahead
        while True:
            growth = 0
            for s in self.running:
                if s.decoding:
                    for c in s.held_state.kv:
                        if c.length + step > c.capacity:
                            growth += (grown_capacity(c.capacity, c.length + step) - c.capacity) * per_layer
            requests = {id(s.request): s.request for s in self.running}
            if self.usage() + growth <= self.memory.budget or len(requests) <= 1:
                break
            self.preempt(max(requests.values(), key=lambda r: r.arrival))
        return [s for s in self.running if s.decoding]

    def check_stop(self, seq: Sequence, tok: int) -> None:
        """Set `seq`'s finish reason if `tok` (just appended) ends it; `reap` frees it after the phase."""
        p = seq.request.params
        if len(seq.token_ids) >= p.min_tokens:
            stops = p.stop_token_ids
            assert stops is not None  # SamplingParams.__post_init__ makes None []
            if tok in stops:
                seq.finish_reason, seq.stop_reason = "stop", tok
            elif not p.ignore_eos and tok in self.eos_token_ids:
                seq.finish_reason = "stop"
        if seq.finish_reason is None:
            if p.max_tokens is not None and len(seq.token_ids) >= p.max_tokens:
                seq.finish_reason = "length"
            elif seq.num_inputs >= seq.request.max_len:
                seq.finish_reason = "length"

    def reap(self) -> None:
        """Free the state of every running sequence that finished."""
        for seq in [s for s in self.running if s.finished]:
            self.drop(seq)

    # -- prefill ----------------------------------------------------------------------------------
    def schedule_prefill(self) -> list[Chunk]:
        """This step's prefill chunks, ≤ max_prefill_tokens in all, admitting their sequences first (empty:
        nothing waits, or it waits for room). The first is `pick_prefill`'s; the others are the next ones
        the policy would pick that can share its forward (`packs_with`)."""
        chunks: list[Chunk] = []
        budget, taken = self.max_prefill_tokens, set()
        while budget > 0:
            if not chunks:
                seq = pick_prefill(self.waiting, self._admit, self._fits)
            else:
                first = chunks[0].seq
                if first.request.mm is not None:
                    break
                # the oldest sequence to admit must share the pack, or no later one is admitted (arrival order)
                joins = functools.partial(packs_with, first)
                candidates = [s for s in self.waiting if id(s) not in taken and (s.state is None or joins(s))]
                seq = pick_prefill(candidates, functools.partial(self._admit_beside, first), self._fits)
            if seq is None:
                break
            taken.add(id(seq))
            target, start = seq.prefill_target, seq.num_computed
            if start >= target:  # a resumed sequence restored whole from the prefix cache
                self.waiting.remove(seq)
                continue
            chunk = Chunk(seq, start, chunk_end(start, target, budget, self.block), target)
            chunks.append(chunk)
            budget -= chunk.end - chunk.start
        for chunk in chunks:
            if not chunk.last:  # its turn is over: the others go first
                self.waiting.remove(chunk.seq)
                self.waiting.append(chunk.seq)
        return chunks

    def prefilled(self, seq: Sequence) -> None:
        """`seq`'s prompt is in its state: it leaves the queue (and decodes from the next step)."""
        self.waiting.remove(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sequence (its state copied by the runner) joins its parent."""
        seq.request.seqs.append(seq)
        self.running.append(seq)

    # -- memory -----------------------------------------------------------------------------------
    def usage(self) -> int:
        return sum(s.held_state.kv_nbytes() for s in self.running) + len(self.running) * self.pool.slot_nbytes()

    def _admit_beside(self, first: Sequence, seq: Sequence) -> bool:
        return packs_with(first, seq) and self._admit(seq)

    def _fits(self, seq: Sequence) -> bool:
        return self.admissible(seq.request.adapter, {s.request.adapter for s in self.running})

    def _admit(self, seq: Sequence) -> bool:
        slots_needed = seq.request.params.n if not seq.token_ids else 1
        if len(self.pool.free_slots) < slots_needed:
            return False
        need = self.memory.kv_token_bytes * (seq.prefill_target + 1) * slots_needed
        if self.running and self.usage() + need > self.memory.budget:
            return False  # requests beyond the budget wait; alone, a request always runs
        self.start(seq)
        self.running.append(seq)
        return True

    def preempt(self, req: Request) -> None:
        """Free every state of `req`; its sequences go back to the front of the queue (recomputed later)."""
        self.stats["preemptions"] += 1
        for seq in reversed(req.seqs):
            if seq.finished or seq.state is None:
                continue
            self.drop(seq)
            seq.num_computed = 0
            if not seq.token_ids:
                req.prompt_logprobs.clear()
                req.prompt_top_logprobs.clear()
            self.waiting.appendleft(seq)  # resumes first, by recompute (+ prefix cache)

    def drop(self, seq: Sequence) -> None:
        if seq.state is not None:
            self.pool.release(seq.state.slot)
            seq.state = None
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
