"""`deltarun batch` on this machine: one engine, every line through its continuous batcher.

Lines are read as they are needed and at most `max_in_flight` run at once (memory stays bounded whatever
the file's size); each answer is appended to OUT and flushed as soon as it is ready, so a run that is
stopped loses nothing written and the next run skips it (batch_lines.done_ids). Output order follows
completion, not input.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, TextIO

from .batch_lines import LineRunner, done_ids, generated_tokens, input_lines, parse_line
from .progress import BatchProgress


def is_error(line: dict[str, Any]) -> bool:
    return line.get("error") is not None or (line.get("response") or {}).get("status_code") != 200


def pending_lines(src: Path, name: str, done: set[str]) -> tuple[int, int]:
    """(how many lines are left, how many were already done): one streaming pass for the progress bar."""
    left = skipped = 0
    for raw in input_lines(src):
        line = parse_line(raw, name)
        cid = line["custom_id"] if isinstance(line, dict) else line.custom_id
        if cid in done:
            skipped += 1
        else:
            left += 1
    return left, skipped


def write_line(out: TextIO, line: dict[str, Any]) -> None:
    out.write(json.dumps(line, ensure_ascii=False) + "\n")
    out.flush()


async def run_local(llm: Any, name: str, src: Path, dst: Path, *, max_in_flight: int = 32,
                    progress: bool | None = None, default_thinking: bool | None = None) -> BatchProgress:
    """Answer every line of `src` not yet in `dst` with `llm` (an AsyncLLM), appending to `dst`."""
    done = done_ids(dst)
    left, skipped = pending_lines(src, name, done)
    runner = LineRunner(llm, name, default_thinking)
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task] = set()
    with dst.open("a", encoding="utf-8") as out, BatchProgress(left + skipped, skipped, enabled=progress) as bar:
        async def one(raw: str) -> None:
            try:
                line = await runner.run(raw)
            finally:
                slots.release()
            write_line(out, line)
            bar.advance(generated_tokens(line), is_error(line))

        try:
            for raw in input_lines(src):
                parsed = parse_line(raw, name)
                cid = parsed["custom_id"] if isinstance(parsed, dict) else parsed.custom_id
                if cid in done:
                    continue
                done.add(cid)  # a custom_id given twice is answered once
                await slots.acquire()
                task = asyncio.ensure_future(one(raw))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
        finally:
            for t in tasks:
                t.cancel()
            await runner.close()
    return bar

