"""Per-sequence model state: growable KV for full-attention layers, pooled fixed-size DeltaNet slots.

Layout:
  * full-attention layer → one `KVCache` per sequence: k, v [1, Hkv, capacity, D] in the model dtype.
    Capacity is reserved for the whole prompt at admission and grows ×1.5 while decoding, so memory
    follows the tokens held (within 50%) and a prompt of any length is never re-copied while prefilling.
  * linear-attention layer → a `StatePool`: conv [S, conv_dim, K-1] (model dtype) and recurrent
    [S, Hv, Dk, Dv] (fp32 whatever the weights) for S slots; a running sequence owns one slot index.
    Decode gathers the batch's slots and scatters the new states back. Speculative decoding can take
    extra slots per sequence (k+1 states) from the same pool.
A `ModelCache` is the view the model runs on: the pool plus the sequences of this batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

GROWTH = 1.5


@dataclass
class KVCache:
    k: torch.Tensor | None = None  # [1, Hkv, capacity, D]
    v: torch.Tensor | None = None
    length: int = 0

    def reserve(self, capacity: int, like: torch.Tensor) -> None:
        """Make room for `capacity` tokens (keeps what is held)."""
        if self.k is not None and self.k.shape[2] >= capacity:
            return
        shape = (1, like.shape[1], capacity, like.shape[3])
        nk, nv = like.new_empty(shape), like.new_empty(shape)
        if self.length:
            nk[:, :, : self.length] = self.k[:, :, : self.length]
            nv[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = nk, nv

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [1, Hkv, T, D]; return views of all held keys and values [1, Hkv, length, D]."""
        need = self.length + k.shape[2]
        if self.k is None or need > self.k.shape[2]:
            self.reserve(max(need, int(self.capacity * GROWTH), 64), k)
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def copy_prefix(self, other: "KVCache", n: int) -> None:
        """Hold exactly the first n tokens of `other` (a prefix-cache hit)."""
        self.k = self.v = None
        self.length = 0
        if n:
            self.reserve(n, other.k)
            self.k[:, :, :n] = other.k[:, :, :n]
            self.v[:, :, :n] = other.v[:, :, :n]
            self.length = n

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


class StatePool:
    """DeltaNet states for `num_slots` sequences, one pair of tensors per linear-attention layer."""

    def __init__(self, shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], num_slots: int,
                 dtype: torch.dtype, device: torch.device):
        self.conv = [torch.zeros(num_slots, *c, dtype=dtype, device=device) for c, _ in shapes]
        self.recurrent = [torch.zeros(num_slots, *r, dtype=torch.float32, device=device) for _, r in shapes]
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.num_slots = num_slots

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
class SeqState:
    """The model state one sequence owns: a pool slot and its KV caches."""

    slot: int
    kv: list[KVCache]
    length: int = 0  # tokens processed so far (the next token's position)

    def kv_nbytes(self) -> int:
        return sum(c.nbytes() for c in self.kv)


@dataclass
class ModelCache:
    """What one forward runs on: the pool and the batch's sequences (all advancing by the same T)."""

    pool: StatePool
    seqs: list[SeqState]
    extra: dict = field(default_factory=dict)

    @property
    def length(self) -> int:  # single-sequence convenience (tests, benchmarks)
        return self.seqs[0].length

    def slots(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([s.slot for s in self.seqs], device=device)
