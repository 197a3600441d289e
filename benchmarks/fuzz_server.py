"""Fuzz (not a test): schemathesis against a live server's /openapi.json, more cases than the suite's run.

    python benchmarks/fuzz_server.py --max-examples 500

The server is the suite's (tests/fuzz_driver.py): a tiny random checkpoint with the real tokenizer and chat
template, served as "tiny" with empty temporary model stores, offline, http media off. Prints a per-route
table of cases and 2xx / 4xx / 5xx answers, the tracebacks in the server log and every check failure
(5xx, an error body not in its API's shape, a valid body refused); exits 1 when there is any.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_driver import fuzz_server, run  # noqa: E402
from tiny import make_checkpoint, tiny_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-examples", type=int, default=500, help="per route and mode (valid / invalid)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--failures", type=Path, help="also write each failing request (whole) to this JSONL file")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="deltarun-fuzz-") as tmp:
        root = Path(tmp)
        ckpt = make_checkpoint(root / "ckpt" / "tiny", tiny_config(vocab_size=248320), seed=5, tokenizer=True)
        start = time.perf_counter()
        with fuzz_server(ckpt, root / "stores") as live:
            report = run(live.url, live.raw_schema, max_examples=a.max_examples, seed=a.seed)
            tracebacks = live.log.tracebacks
    print(f"{a.max_examples} examples per route and mode, seed {a.seed}, {time.perf_counter() - start:.0f} s\n")
    print(report.table(len(tracebacks)))
    if report.excused:
        print("\nvalid bodies refused for a documented reason (tests/fuzz_schema.py `excused`):")
        for what, n in sorted(report.excused.items()):
            print(f"  {what}: {n}")
    for route, problem, request in report.failures[:50]:
        print(f"\nFAIL {route}: {problem}\n  request: {request[:400]}")
    if a.failures:
        a.failures.write_text("".join(json.dumps({"route": r, "problem": p, "request": q}) + "\n"
                                      for r, p, q in report.failures))
    for tb in tracebacks[:10]:
        print("\n" + tb)
    return 1 if report.failures or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
