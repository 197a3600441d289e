"""Prefix keys for routing: chained hashes of a prompt's token blocks (no Ray here, so tests run anywhere).

Request i's blocks are `block_hashes(ids)`: hash 0 covers tokens [0, B), hash k covers [0, (k+1)B) (each
chains the previous), so two prompts share their first k hashes exactly when they share their first k*B
tokens. A replica that ran a prompt holds its prefix in its prefix cache (engine/: snapshots every 64
tokens), so the router prefers the replica whose recorded hashes match the longest part of a new prompt.
A prompt shorter than one block gets one hash of all of it (it still lands on a fixed replica).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BLOCK = 16  # tokens per hash: a shared system prompt or earlier turn is usually many blocks long
MAX_BLOCKS = 256  # hashes per prompt: past 4,096 tokens, the head decides where it runs


def block_hashes(ids: Sequence[int], block: int = BLOCK, limit: int = MAX_BLOCKS) -> list[int]:
    """Chained 64-bit hashes of `ids`' full blocks (at least one: a short prompt hashes whole)."""
    out: list[int] = []
    h = hashlib.blake2b(digest_size=8)
    full = min(len(ids) // block, limit)
    for k in range(max(full, 1)):
        chunk = ids[k * block:(k + 1) * block] if full else ids
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in chunk))
        out.append(int.from_bytes(h.copy().digest(), "little"))
    return out


def rendezvous(key: int, names: Iterable[str]) -> str | None:
    """The name that `key` prefers among `names` (highest random weight: stable as names come and go)."""
    best, best_score = None, -1
    for name in names:
        score = int.from_bytes(hashlib.blake2b(f"{key}:{name}".encode(), digest_size=8).digest(), "little")
        if score > best_score:
            best, best_score = name, score
    return best


class PrefixTable:
    """Which replica ran which prefixes: per replica, the most recent `capacity` block hashes (LRU)."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self.held: dict[str, OrderedDict[int, None]] = {}

    def record(self, replica: str, hashes: Sequence[int]) -> None:
        table = self.held.setdefault(replica, OrderedDict())
        for h in hashes:
            table[h] = None
            table.move_to_end(h)
        while len(table) > self.capacity:
            table.popitem(last=False)

    def forget(self, replica: str) -> None:
        self.held.pop(replica, None)

    def match(self, replica: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of the prompt `replica` has run (0: none)."""
        table = self.held.get(replica)
        if not table:
            return 0
        lo, hi = 0, len(hashes)  # chained hashes: matches form a prefix, so bisect for its end
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in table:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def preferred(self, hashes: Sequence[int], replicas: Sequence[str]) -> str | None:
        """The replica holding the longest prefix of the prompt; with none, the prompt's rendezvous choice."""
        if not replicas:
            return None
        best = max(replicas, key=lambda r: self.match(r, hashes))
        if self.match(best, hashes):
            return best
        return rendezvous(hashes[0], sorted(replicas)) if hashes else replicas[0]
