"""`deltarun batch --ray`: Ray Data streams the input through an actor pool of engines.

`read_text(IN)` (a raw line per row, so a line that is not JSON becomes an error line instead of failing
the read, which `read_json` would) → `map_batches(BatchEngine, concurrency=N)`: each actor loads the model
once and answers a batch's lines concurrently through its own engine (batch_lines.LineRunner: the server's
routes in-process) → the driver iterates the results as they stream out and appends each to OUT, flushed.
Ray Data's backpressure keeps only a few batches in flight, so the file never has to fit in memory. Lines
already in OUT are skipped (their custom_ids travel to the actors once, through the object store).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np

from .batch_lines import done_ids, generated_tokens, parse_line
from .batch_local import is_error, pending_lines, write_line
from .progress import BatchProgress


class BatchEngine:
    """One Ray Data actor: a model and its engine, answering batches of raw lines."""

    def __init__(self, model_path: str, name: str, engine_options: dict[str, Any], done: Any,
                 default_thinking: bool | None = None):
        import ray

        from ..async_llm import AsyncLLM
        from .batch_lines import LineRunner

        self.loop = asyncio.new_event_loop()  # one loop for the actor's life: the app's state is bound to it
        self.llm = AsyncLLM(model_path, **engine_options)
        self.runner = LineRunner(self.llm, name, default_thinking)
        self.name = name
        self.done: set[str] = ray.get(done) if isinstance(done, ray.ObjectRef) else done

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        todo = []
        for raw in batch["text"]:
            if not str(raw).strip():
                continue
            parsed = parse_line(str(raw), self.name)
            cid = parsed["custom_id"] if isinstance(parsed, dict) else parsed.custom_id
            if cid not in self.done:
                todo.append(str(raw))

        async def answer() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(self.runner.run(raw) for raw in todo)))

        lines = self.loop.run_until_complete(answer()) if todo else []
        return {"line": np.array([json.dumps(x, ensure_ascii=False) for x in lines], dtype=object)}


def run_ray(model_path: str, name: str, src: Path, dst: Path, engine_options: dict[str, Any], *,
            actors: int = 1, actor_cpus: float = 1.0, actor_gpus: float = 0.0, batch_size: int = 16,
            progress: bool | None = None, default_thinking: bool | None = None) -> BatchProgress:
    """Answer every line of `src` not yet in `dst` on the Ray cluster (already joined: loopback.ray_init)."""
    import ray

    done = done_ids(dst)
    left, skipped = pending_lines(src, name, done)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts lines and tokens
    ctx.execution_options.preserve_order = False
    # reading is light: it takes no CPU slot, which the engines (one per CPU they were given) may all hold
    ds = ray.data.read_text(str(src.resolve()), ray_remote_args={"num_cpus": 0})
    args = (model_path, name, engine_options, ray.put(done), default_thinking)
    ds = ds.map_batches(BatchEngine, fn_constructor_args=args,
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus,
                        num_gpus=actor_gpus, batch_format="numpy")
    written = set(done)
    with dst.open("a", encoding="utf-8") as out, BatchProgress(left + skipped, skipped, enabled=progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["line"]:
                line = json.loads(text)
                if line["custom_id"] in written:  # a custom_id given twice in the input: answered once
                    continue
                written.add(line["custom_id"])
                write_line(out, line)
                bar.advance(generated_tokens(line), is_error(line))
    return bar
