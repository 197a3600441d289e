"""The `deltarun` process around a command: `run` is the console command (and `python -m deltarun`).

Start: the cyclic GC is paused while torch imports and the model loads (cli/startup.py).

Exit: after a command returns, the interpreter would tear itself down — every module, tensor, the tokenizer's 248K
tables and tiktoken's encoder freed one object at a time: 0.7–1.3 s of a 3 s `deltarun generate` (strace: no
system calls, only the frees), longer than loading the model. So what a normal exit does that anyone can see still
happens — the atexit handlers (logging's flush, Ray's shutdown, …) and flushing stdout and stderr — and then the
process ends without freeing its memory, which the kernel takes back whole. Where a non-daemon thread is still
running, the normal exit (which waits for it) is kept. `main` itself (tests, embedding callers) touches neither.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading

from .startup import loaded, pause


def run(argv: list[str] | None = None) -> None:
    pause()
    from .main import main

    try:
        code = main(argv)
    finally:
        loaded()
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # the handlers a normal exit runs (CPython's own API for it)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)

