"""The console command's exit (cli/process.py): after the command, atexit handlers run and buffered output is
flushed, the exit code is the command's, and a running non-daemon thread is still waited for — only the
interpreter's teardown is skipped."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_atexit_handlers_run_and_buffered_output_arrives():
    r = _run("""
        import atexit, sys
        from deltarun.cli.process import run
        atexit.register(lambda: print("atexit ran"))
        sys.stdout.write("x" * 100_000)  # buffered: stdout is a pipe
        run(["generate", "/no/such/model", "hi"])
    """)
    assert r.returncode == 1, r.stderr
    assert "deltarun: error:" in r.stderr
    assert r.stdout.startswith("x" * 100_000) and r.stdout.rstrip().endswith("atexit ran")


def test_a_running_non_daemon_thread_is_waited_for():
    r = _run("""
        import threading, time
        from deltarun.cli.process import run
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", flush=True))).start()
        run(["generate", "/no/such/model", "hi"])
    """)
    assert r.returncode == 1 and "thread done" in r.stdout


def test_the_collector_is_paused_for_startup_only():
    """run() pauses the cyclic GC while torch imports and the model loads, then freezes what exists and resumes it:
    by the end of a command (here one that fails before loading) it runs again."""
    r = _run("""
        import atexit, gc
        from deltarun.cli.process import run
        atexit.register(lambda: print("enabled", gc.isenabled(), "frozen", gc.get_freeze_count() > 0))
        run(["generate", "/no/such/model", "hi"])
    """)
    assert r.returncode == 1 and "enabled True frozen True" in r.stdout, r.stdout + r.stderr
