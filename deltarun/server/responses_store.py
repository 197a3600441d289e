"""Stored responses (`store: true`, the default) for `GET /v1/responses/{id}`, `input_items` and
`previous_response_id`: in memory only, bounded by count and by size, least recently used dropped first.

An entry keeps the response object, the input items of its own turn (what `input_items` lists), the
whole conversation up to and including its output (as chat messages; without `instructions`, which the
API does not carry over) and the exact prompt text and token ids of its turn, so the next turn can start
with the very same tokens and the prefix cache can serve them. The size bound counts an entry's response,
input items, prompt text and ids; its conversation shares the message dicts of its ancestors.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError

ID_RE = re.compile(r"resp_[0-9a-f]{24}")  # what common.new_id("resp_") makes


@dataclass
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    messages: list[dict[str, Any]]  # the conversation, this response's output included
    prompt_text: str = ""  # this turn's rendered prompt, "" when it cannot be reused (images)
    prompt_ids: list[int] = field(default_factory=list)  # its tokens (the expanded ids when it has images)
    size: int = 0


class ResponseStore:
    def __init__(self, max_entries: int = 1024, max_bytes: int = 256 << 20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, rid: str, entry: StoredResponse) -> None:
        entry.size = (len(json.dumps([entry.response, entry.input_items], ensure_ascii=False))
                      + len(entry.prompt_text) + 8 * len(entry.prompt_ids))
        with self._lock:
            self._drop(rid)
            self._items[rid] = entry
            self._bytes += entry.size
            while self._items and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
                self._drop(next(iter(self._items)))

    def get(self, rid: str, param: str = "response_id") -> StoredResponse:
        """The entry (now the most recently used); 404 for an unknown id or one not shaped like ours (the same
        answer: an id is only ever looked up in this dict, never used as a path)."""
        with self._lock:
            entry = self._items.get(rid) if ID_RE.fullmatch(rid) else None
            if entry is None:
                raise APIError(404, "no stored response with that id (responses are kept in memory, a bounded "
                               "number of them, and only with store: true)", param=param)
            self._items.move_to_end(rid)
            return entry

    def delete(self, rid: str) -> None:
        self.get(rid)
        with self._lock:
            self._drop(rid)

    def _drop(self, rid: str) -> None:
        old = self._items.pop(rid, None)
        if old is not None:
            self._bytes -= old.size

    def __len__(self) -> int:
        return len(self._items)
