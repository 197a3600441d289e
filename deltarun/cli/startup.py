"""Python's cyclic garbage collector during the `deltarun` process's start (cli/process.py pauses it).

While torch imports and the model loads, millions of objects are made that all live to the end, and each full
collection walked all of them again: 0.2–0.3 s of a 2.3 s `deltarun generate` (2-core Zen 4). So the console
command pauses the collector first; `loaded` (the model is loaded, or the command loads none) freezes every object
made so far out of its reach and resumes it. Callers of `main` itself (tests, embedders) are never affected.
"""
from __future__ import annotations

import gc

_paused: list[bool] = []  # [True] while the console command holds the collector paused


def pause() -> None:
    if gc.isenabled():
        gc.disable()
        _paused.append(True)


def loaded() -> None:
    """Startup is over: the collector runs again, over what is made from now on only. Does nothing unless `pause`
    paused it."""
    if _paused:
        _paused.clear()
        gc.freeze()
        gc.enable()
