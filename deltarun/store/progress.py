"""`ProgressBars`: the part of tqdm's interface that huggingface_hub's snapshot_download drives, for the
download progress of `deltarun pull` (rich bars) and `/api/pull` (NDJSON lines) to subclass. Not here: the
download itself and its checks (pull.py)."""
from __future__ import annotations

import threading
from typing import Any


class ProgressBars:
    """The part of tqdm's interface that huggingface_hub's snapshot_download drives (`tqdm_class=`).

    Subclasses show the progress: `start()` when a bar opens, `report()` whenever it changes.
    """

    _lock = threading.RLock()

    @classmethod
    def get_lock(cls):
        return cls._lock

    @classmethod
    def set_lock(cls, lock):
        cls._lock = lock

    def __init__(self, iterable: Any = None, *args: Any, desc: str | None = None, total: float | None = None,
                 initial: int = 0, unit: str = "it", **kwargs: Any) -> None:
        self.iterable, self.desc, self.unit, self.n = iterable, desc or "", unit, initial or 0
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self._total = total
        self.format_dict: dict = {"rate": None}
        self.start()

    @property
    def total(self):
        return self._total

    @total.setter
    def total(self, value):
        self._total = value
        self.report()

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return int(self._total or 0)

    def update(self, n=1):
        self.n += n or 0
        self.report()

    def refresh(self, *args, **kwargs):
        self.report()

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or self.desc
        self.report()

    set_description_str = set_description

    def reset(self, total=None):
        self.n, self._total = 0, total
        self.report()

    def close(self):
        self.report()

    def set_postfix_str(self, *args, **kwargs):
        pass

    def clear(self, *args, **kwargs):
        pass

    def display(self, *args, **kwargs):
        pass

    @staticmethod
    def write(*args, **kwargs):
        pass

    def start(self) -> None:
        pass

    def report(self) -> None:
        pass
