"""Per-sequence model state: growable KV for full-attention layers, pooled fixed-size DeltaNet slots.

Layout:
  * full-attention layer → one `KVCache` per sequence: k, v [1, Hkv, capacity, D] in the model dtype.
    Capacity is reserved for the whole prompt at admission and grows ×1.5 while decoding, so memory
    follows the tokens held (within 50%) and a prompt of any length is never re-copied while prefilling.
  * linear-attention layer → a `StatePool`: conv [S, conv_dim, K-1] (model dtype) and recurrent
    [S, Hv, Dk, Dv] (fp32 whatever the weights) for S slots; a running sequence owns one slot index. On the
    CPU the pool's pages take memory only once a slot is used (`untouched_zeros`).
    Decode gathers the batch's slots and scatters the new states back. Speculative decoding's verify
    forward records the states after each position in a per-layer scratch (`verify_buffer`), not in slots.
  * MTP head (speculative decoding) → a `DraftState` per sequence: the head's own KV and pending hidden rows.
A `ModelCache` is the view the model runs on: the pool plus the sequences of this batch (and, for a verify
forward, the dict the DeltaNet layers record their per-position states in).
"""
from __future__ import annotations

import itertools
import math
import mmap
from dataclasses import dataclass, field

import torch

GROWTH = 1.5


def grown_capacity(capacity: int, need: int) -> int:
    """The capacity a KV cache holding `capacity` tokens grows to when it must hold `need` (> capacity)."""
    return max(need, int(capacity * GROWTH), 64)


@dataclass
class KVCache:
    """One sequence's keys and values for one full-attention layer, grown ×1.5 as needed.

    `quantized`: held as int8 with one fp32 scale per (head, token) — half of bf16's memory; keys and
    values are dequantized to the model dtype when attention reads them."""
    k: torch.Tensor | None = None  # [1, Hkv, capacity, D] (int8 when quantized)
    v: torch.Tensor | None = None
    length: int = 0
    quantized: bool = False
    k_scale: torch.Tensor | None = None  # [1, Hkv, capacity, 1] fp32, when quantized
    v_scale: torch.Tensor | None = None
    dtype: torch.dtype | None = None  # what attention reads

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def reserve(self, capacity: int, like: torch.Tensor) -> None:
        """Make room for `capacity` tokens (keeps what is held)."""
        if self.k is not None and self.k.shape[2] >= capacity:
            return
        self.dtype = self.dtype or like.dtype
        shape = (1, like.shape[1], capacity, like.shape[3])
        store = torch.int8 if self.quantized else like.dtype
        new = [like.new_empty(shape, dtype=store), like.new_empty(shape, dtype=store)]
        if self.quantized:
            new += [like.new_empty((*shape[:3], 1), dtype=torch.float32) for _ in range(2)]
        for old, fresh in zip(self._tensors(), new):
            if self.length:
                fresh[:, :, : self.length] = old[:, :, : self.length]
        self.k, self.v = new[0], new[1]
        if self.quantized:
            self.k_scale, self.v_scale = new[2], new[3]

    def make_room(self, need: int, like: torch.Tensor) -> None:
        """Capacity for `need` tokens, grown ×GROWTH (at least 64) when short; like: [1, Hkv, ·, D]."""
        if need > self.capacity:
            self.reserve(grown_capacity(self.capacity, need), like)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [1, Hkv, T, D]; return all held keys and values [1, Hkv, length, D]."""
        need = self.length + k.shape[2]
        self.make_room(need, k)
        kc, vc = self.k, self.v
        assert kc is not None and vc is not None  # make_room allocated them
        if not self.quantized:
            kc[:, :, self.length : need] = k
            vc[:, :, self.length : need] = v
            self.length = need
            return kc[:, :, :need], vc[:, :, :need]
        ks, vs = self.k_scale, self.v_scale
        assert ks is not None and vs is not None  # allocated with the int8 keys and values
        for x, q, sc in ((k, kc, ks), (v, vc, vs)):
            scale = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
            q[:, :, self.length : need] = torch.round(x.float() / scale).to(torch.int8)
            sc[:, :, self.length : need] = scale
        self.length = need
        return (kc[:, :, :need] * ks[:, :, :need]).to(self.dtype), \
            (vc[:, :, :need] * vs[:, :, :need]).to(self.dtype)

    def copy_prefix(self, other: "KVCache", n: int) -> None:
        """Hold exactly the first n tokens of `other` (a prefix-cache hit)."""
        self.k = self.v = self.k_scale = self.v_scale = None
        self.length = 0
        self.quantized, self.dtype = other.quantized, other.dtype
        if n:
            src = other.k
            assert src is not None  # `other` holds at least n tokens
            self.reserve(n, src if not other.quantized else src.to(other.dtype))
            for dst, src in zip(self._tensors(), other._tensors()):
                dst[:, :, :n] = src[:, :, :n]
            self.length = n

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def token_bytes(self) -> int:
        """Bytes one held token takes."""
        return self.nbytes() // self.capacity if self.capacity else 0


def untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros that costs no memory until written, on the CPU: an anonymous mapping reads as zeros and gets
    a page only when one is touched (torch.zeros writes every page). A pool sized for `max_num_seqs` sequences
    (~19 MB a slot for the 0.8B shape, ~50 MB for 9B) then holds only the slots sequences have used."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class StatePool:
    """DeltaNet states for `num_slots` sequences, one pair of tensors per linear-attention layer."""

    def __init__(self, shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], num_slots: int,
                 dtype: torch.dtype, device: torch.device):
        self.conv = [untouched_zeros((num_slots, *c), dtype, device) for c, _ in shapes]
        self.recurrent = [untouched_zeros((num_slots, *r), torch.float32, device) for _, r in shapes]
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.num_slots = num_slots
        self._verify: dict[int, torch.Tensor] = {}

    def verify_buffer(self, index: int, t: int, b: int) -> torch.Tensor:
        """Layer `index`'s scratch for t recurrent states of b rows [t, b, Hv, Dk, Dv], kept between verify
        steps and grown as needed (fresh megabyte-sized allocations each step cost page faults: ~2× the copy)."""
        buf = self._verify.get(index)
        if buf is None or buf.shape[0] < t or buf.shape[1] < b:
            old = (0, 0) if buf is None else buf.shape[:2]
            r = self.recurrent[index]
            buf = self._verify[index] = r.new_empty(max(t, old[0]), max(b, old[1]), *r.shape[1:])
        return buf[:t, :b]

    def drop_verify_buffers(self) -> None:
        """Free the verify scratch (speculation paused: auto found plain decoding cheaper, and may not probe
        again for thousands of steps); the next verify step allocates it afresh."""
        self._verify.clear()

    def alloc(self) -> int:
        if not self.free_slots:
            raise RuntimeError("no free DeltaNet state slot")
        slot = self.free_slots.pop()
        for t in (*self.conv, *self.recurrent):
            t[slot].zero_()
        return slot

    def release(self, slot: int) -> None:
        assert slot not in self.free_slots, f"slot {slot} released twice"
        self.free_slots.append(slot)

    def snapshot(self, slot: int) -> list[torch.Tensor]:
        return [t[slot].clone() for t in (*self.conv, *self.recurrent)]

    def restore(self, slot: int, snap: list[torch.Tensor]) -> None:
        for t, s in zip((*self.conv, *self.recurrent), snap):
            t[slot].copy_(s)

    def copy_slot(self, src: int, dst: int) -> None:
        for t in (*self.conv, *self.recurrent):
            t[dst].copy_(t[src])

    def slot_nbytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (*self.conv, *self.recurrent))


@dataclass
class DraftState:
    """One sequence's MTP head context (engine/speculative.py): the head layer's KV, and target hidden states
    not yet fed to the head."""

    kv: KVCache
    pos: int  # position of hidden[0]; hidden row i pairs with the token at position pos + i + 1
    hidden: torch.Tensor | None = None  # [P, H]

    def nbytes(self) -> int:
        return self.kv.nbytes() + (self.hidden.numel() * self.hidden.element_size() if self.hidden is not None else 0)


@dataclass
class SeqState:
    """The model state one sequence owns: a pool slot, its KV caches and (speculating) its MTP context."""

    slot: int
    kv: list[KVCache]
    length: int = 0  # tokens processed so far (the next token's position)
    draft: DraftState | None = None

    def kv_nbytes(self) -> int:
        return sum(c.nbytes() for c in self.kv) + (self.draft.nbytes() if self.draft is not None else 0)


@dataclass
class ModelCache:
    """What one forward runs on: the pool and the batch's sequences (all advancing by the same T, or packed:
    `seq_lens`)."""

    pool: StatePool
    seqs: list[SeqState]
    # A verify forward (speculative decoding) passes {}: each linear-attention layer then records
    # {index: (conv input window [B, C, K-1+T], recurrent states after positions 0 … T−2 [T−1, B, Hv, Dk, Dv])}
    # (after the last position the state is the pool's own; the recorded ones live in `verify_buffer`).
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    slot_ids: tuple[tuple[int, int], torch.Tensor] | None = None  # the fused layers' slot-index tensor, per forward
    # A packed forward (several prompts' chunks in one: their matmuls share one pass over the weights): the
    # batch is one row holding seqs[0]'s seq_lens[0] inputs, then seqs[1]'s seq_lens[1], …
    seq_lens: list[int] | None = None
    spans: list[slice] | None = field(init=False)  # packed: each sequence's positions in the row

    def __post_init__(self) -> None:
        ends = list(itertools.accumulate(self.seq_lens or []))
        self.spans = None if self.seq_lens is None else [slice(e - n, e) for e, n in zip(ends, self.seq_lens)]

    @property
    def length(self) -> int:  # single-sequence convenience (tests, benchmarks)
        return self.seqs[0].length

    def slots(self, device: torch.device) -> torch.Tensor | slice:
        """The batch's pool slots: a slice when they are consecutive (the pool's states are then read
        and updated in place, as views), else an index tensor (gathered and scattered back)."""
        ids = [s.slot for s in self.seqs]
        if ids == list(range(ids[0], ids[0] + len(ids))):
            return slice(ids[0], ids[0] + len(ids))
        return torch.tensor(ids, device=device)
