"""The batch progress bar (rich): lines done of the input's, tokens generated per second, time left."""
from __future__ import annotations

import sys
import time
from typing import Any


class BatchProgress:
    """`with BatchProgress(total, skipped) as p: p.advance(tokens)`; quiet when stderr is not a terminal
    (then one summary line at the end)."""

    def __init__(self, total: int, skipped: int = 0, *, enabled: bool | None = None):
        self.total, self.skipped = total, skipped
        self.done = self.tokens = self.errors = 0
        self.start = time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None

    def __enter__(self) -> "BatchProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("batch", total=self.total, completed=self.skipped, rate="")
        return self

    def advance(self, tokens: int, error: bool = False) -> None:
        self.done += 1
        self.tokens += tokens
        self.errors += error
        if self._bar is not None:
            self._bar.update(self._task, advance=1, rate=f"{self.rate():.1f} tok/s")

    def rate(self) -> float:
        return self.tokens / max(1e-9, time.monotonic() - self.start)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
        print(f"deltarun batch: {self.done} lines answered ({self.errors} errors), {self.skipped} already done, "
              f"{self.tokens} tokens at {self.rate():.1f} tok/s", file=sys.stderr, flush=True)
