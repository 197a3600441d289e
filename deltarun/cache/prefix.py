"""Exact prefix reuse for hybrid models: DeltaNet state snapshots + the KV of the prefix, keyed by tokens.

A DeltaNet state cannot be cut back to an earlier position, so reuse needs the state *at* a boundary.
Entries are made at `block`-aligned positions (64 tokens by default) where the engine ends a prefill
chunk: the snapshot of every linear-attention layer's conv + recurrent state and a reference to the
sequence's KV caches (only their first `length` positions are read, and those never change).
Keys form a hash chain over the token blocks (blake2b, 128-bit), so a key names the whole prefix.
The engine keys a prompt with images/videos by its `key_ids`: each vision token replaced by a negative
value derived from its media's content digest, so the same image hits and a different one misses.
A request with a LoRA adapter salts its chain with the adapter's name: states differ per adapter.
A lookup returns the deepest entry along a prompt's chain; the LRU evicts by bytes.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .state import KVCache


@dataclass
class PrefixEntry:
    length: int
    snapshot: list[torch.Tensor]
    kv: list[KVCache]
    nbytes: int


def chain_keys(tokens: list[int], block: int, upto: int, salt: str | None = None) -> list[bytes]:
    """Key of every whole block prefix tokens[:block*(i+1)] with block*(i+1) <= upto; `salt` (an adapter's
    name) starts the chain, so the same tokens under another adapter have other keys."""
    keys: list[bytes] = []
    prev = b"" if salt is None else hashlib.blake2b(salt.encode(), digest_size=16, person=b"adapter").digest()
    for end in range(block, upto + 1, block):
        prev = hashlib.blake2b(prev + array("q", tokens[end - block : end]).tobytes(), digest_size=16).digest()
        keys.append(prev)
    return keys


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 64):
        self.budget = budget_bytes
        self.block = block
        self.entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.hit_tokens = 0

    def lookup(self, tokens: list[int], limit: int, salt: str | None = None) -> PrefixEntry | None:
        """The deepest cached prefix of `tokens` (under adapter `salt`) no longer than `limit` tokens."""
        if self.budget <= 0 or not self.entries:
            return None
        best = None
        for key in chain_keys(tokens, self.block, limit, salt):
            entry = self.entries.get(key)
            if entry is not None:
                best = (key, entry)
        if best is None:
            return None
        self.entries.move_to_end(best[0])
        self.hits += 1
        self.hit_tokens += best[1].length
        return best[1]

    def insert(self, tokens: list[int], length: int, snapshot: list[torch.Tensor], kv: list[KVCache],
               salt: str | None = None) -> None:
        """Remember the state after tokens[:length] (length a multiple of the block) under adapter `salt`."""
        if self.budget <= 0 or length % self.block or length == 0:
            return
        key = chain_keys(tokens, self.block, length, salt)[-1]
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        per_token = sum(c.token_bytes() for c in kv)
        nbytes = sum(t.numel() * t.element_size() for t in snapshot) + per_token * length
        self.entries[key] = PrefixEntry(length, snapshot, kv, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget and self.entries:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0
