"""The one request loop: drive a prepared request through an engine, yielding each step's new text.

Every asynchronous stream of generated text runs through `stream_request`: `AsyncLLM.generate`,
`generate_stream` and `chat_stream`, and every HTTP route (through `EngineClient.stream`). It submits
the request to a `StepSource` (today `AsyncEngine`, the engine thread; a remote replica later), turns
each `StepOutput`'s token ids into text with the `OutputProcessor` (which ends a sequence at a stop
string and tells the engine so), and reports to an optional `RequestObserver` (the server's metrics).
Leaving early (closing the iterator, cancellation, a client gone) aborts the request in the engine.
"""
from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Protocol

from .client import RequestObserver
from .inputs import MultiModalInput, StepOutput
from .outputs import StreamDelta
from .processor.output import OutputProcessor, RequestState
from .sampling import SamplingParams


class StepSource(Protocol):
    """An engine seen from the front end: token ids in, step outputs out (engine/async_engine.py)."""

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 mm: MultiModalInput | None = None, adapter: str | None = None) -> AsyncGenerator[StepOutput, None]: ...

    def finish(self, request_id: str, index: int, reason: str, stop_reason: int | str | None = None) -> None: ...


async def stream_request(engine: StepSource, output: OutputProcessor, req: RequestState,
                         observer: RequestObserver | None = None) -> AsyncGenerator[list[StreamDelta], None]:
    """`req`'s deltas, one list per engine step, until every sequence has ended; `req` accumulates the
    totals (text, token ids, log-probs, finish reasons)."""
    start = time.perf_counter()
    first = True
    if observer is not None:
        observer.request_started()
    ok = False
    try:
        # aclosing: leaving early must abort the request now, not when the generator is collected
        async with aclosing(engine.generate(req.request_id, req.prompt_ids, req.params, req.mm, req.adapter)) as steps:
            async for step in steps:
                deltas = output.update(req, step, engine.finish)
                if first and any(d.token_ids for d in deltas):
                    first = False
                    if observer is not None:
                        observer.first_token(time.perf_counter() - start)
                yield deltas
                if req.finished:  # every sequence ended (maybe by a stop string the engine has not seen yet)
                    break
        ok = True
    finally:
        if observer is not None:
            observer.request_finished(time.perf_counter() - start, len(req.prompt_ids),
                                      sum(len(t.token_ids) for t in req.tracks), ok and req.finished)
