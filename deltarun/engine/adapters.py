"""Which LoRA adapters an engine knows, which are read into memory, and which sit in the model's slots.

The names vLLM gives these limits, with their meanings:
- registered adapters: name → folder (`register`, checked against the model when registered, so a bad
  folder fails its caller, never a running batch);
- `max_cpu_loras`: adapters kept read in memory, least recently used dropped (read again from disk when
  next needed);
- `max_loras`: slots in the model (ops/lora.py `LoRASlots`): distinct adapters one batch may mix. The
  scheduler admits a sequence only while the adapters of the running sequences plus its own fit
  (`admissible`), so every forward's adapters fit in the slots; `slots` fills the slots they need,
  reusing the least recently used slot no running sequence needs.
- `max_lora_rank`: adapters of a higher rank are refused. Unset, the slots grow to the largest rank
  registered (the slots are rebuilt, between forwards, when a larger one comes).

`register` may be called from any thread; `slots` runs on the engine's thread, between forwards.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from torch import nn

from ..ops import lora as lora_ops
from ..weights.lora import Adapter, LoRAError, put, read_adapter

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:/@")


class AdapterSet:
    def __init__(self, model: nn.Module, max_loras: int = 4, max_cpu_loras: int | None = None,
                 max_lora_rank: int | None = None):
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, not {max_loras}")
        if max_cpu_loras is not None and max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({max_loras})")
        if max_lora_rank is not None and max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, not {max_lora_rank}")
        self.model, self.max_loras, self.max_rank = model, max_loras, max_lora_rank
        self.max_cpu = max_cpu_loras if max_cpu_loras is not None else max_loras
        self.paths: dict[str, Path] = {}
        self.ranks: dict[str, int] = {}
        self._read: OrderedDict[str, Adapter] = OrderedDict()  # the in-memory LRU (≤ max_cpu)
        self._slot_names: list[str | None] = [None] * max_loras
        self._slot_lru: list[int] = list(range(max_loras))  # least recently used first
        self._lock = threading.Lock()
        self.loads = 0  # adapters put into a slot (a counter for tests and /metrics)

    def __contains__(self, name: object) -> bool:
        return name in self.paths

    def register(self, name: str, path: str | Path) -> Adapter:
        """Know `name` as the adapter in folder `path` (read and checked now: LoRAError for a bad one)."""
        if not name or len(name) > 200 or not set(name) <= NAME_CHARS:
            raise LoRAError(f"adapter name {name[:40]!r}: use letters, digits and . _ - : / @ (1–200 characters)")
        folder = Path(path).expanduser().resolve()
        with self._lock:
            known = self.paths.get(name)
            if known is not None and known != folder:
                raise LoRAError(f"adapter name {name!r} is already bound to another folder")
        adapter = read_adapter(folder, self.model, self.max_rank)
        with self._lock:
            self.paths.setdefault(name, folder)
            self.ranks[name] = adapter.max_rank
            self._remember(name, adapter)
        return adapter

    def _remember(self, name: str, adapter: Adapter) -> None:
        self._read[name] = adapter
        self._read.move_to_end(name)
        while len(self._read) > self.max_cpu:
            self._read.popitem(last=False)

    def _adapter(self, name: str) -> Adapter:
        with self._lock:
            a = self._read.get(name)
            if a is not None:
                self._read.move_to_end(name)
                return a
            folder = self.paths[name]
        a = read_adapter(folder, self.model, self.max_rank)  # dropped from memory since: read it again
        with self._lock:
            self._remember(name, a)
        return a

    def admissible(self, name: str | None, running: set[str | None]) -> bool:
        """Whether a sequence with adapter `name` may join running sequences using `running` adapters."""
        if name is None or name in running:
            return True
        return len({n for n in running if n is not None}) < self.max_loras

    def slots(self, names: list[str | None]) -> list[int]:
        """The slot of each name (NONE for None), putting adapters not in a slot into the free or least
        recently used slots no name here needs. Engine thread, between forwards."""
        if all(n is None for n in names):
            return [lora_ops.NONE] * len(names)
        wanted = {n for n in names if n is not None}
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"{len(wanted)} adapters in one batch, above max_loras = {self.max_loras}")
        rank = self.max_rank or max(self.ranks[n] for n in wanted)
        slots = self.model.__dict__.get("lora_slots")
        if slots is None or slots.rank < rank or slots.num_slots < self.max_loras:
            rank = max(rank, slots.rank if slots is not None else 0, *(self.ranks.values()))
            slots = lora_ops.slots_of(self.model, self.max_loras, rank)
            self._slot_names = [None] * self.max_loras  # a rebuilt set of slots holds nothing
        where = {n: i for i, n in enumerate(self._slot_names) if n is not None}
        for name in wanted - set(where):
            free = next(i for i in self._slot_lru if self._slot_names[i] not in wanted)
            put(self.model, slots, free, self._adapter(name))
            self._slot_names[free] = name
            where[name] = free
            self.loads += 1
        for name in wanted:
            self._slot_lru.remove(where[name])
            self._slot_lru.append(where[name])
        return [lora_ops.NONE if n is None else where[n] for n in names]
