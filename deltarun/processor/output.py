"""Turn the engine's per-step token ids into text: incremental detokenizing, stop strings, logprobs.

One `RequestState` per request (one `_Track` per sampled sequence); `OutputProcessor.update` consumes a
`StepOutput` and returns the new text per sequence as `StreamDelta`s. When a stop string is found, the
`finish` callback tells the engine to end that sequence. Used by the sync and the async front ends.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..inputs import StepOutput
from ..outputs import CompletionOutput, Logprob, RequestOutput, StreamDelta
from ..sampling import SamplingParams
from .detokenizer import IncrementalDetokenizer, StopChecker
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from ..inputs import MultiModalInput

FinishFn = Callable[[str, int, str, str], None]  # (request_id, index, reason, stop string)


@dataclass
class _Track:
    detok: IncrementalDetokenizer
    stops: StopChecker
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    tracks: list[_Track] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    mm: MultiModalInput | None = None  # the prompt's MultiModalInput (images/videos), passed on to the engine
    cached_tokens: int = 0  # prompt tokens the engine's prefix cache supplied (usage: cached tokens)
    adapter: str | None = None  # the LoRA adapter it runs with (its registered name), passed on to the engine

    @property
    def finished(self) -> bool:
        return all(t.finish_reason is not None for t in self.tracks)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def new_request(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                    params: SamplingParams) -> RequestState:
        state = RequestState(request_id, prompt, prompt_ids, params)
        assert isinstance(params.stop, list)  # SamplingParams.__post_init__ makes it one
        state.tracks = [_Track(IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                               StopChecker(params.stop)) for _ in range(params.n)]
        return state

    def update(self, req: RequestState, step: StepOutput, finish: FinishFn) -> list[StreamDelta]:
        if step.prompt_logprobs is not None:
            assert step.prompt_top_logprobs is not None  # the engine sets both or neither
            req.prompt_logprobs = [
                None if lp is None else self._logprob_dict(req.prompt_ids[i], lp, top or [])
                for i, (lp, top) in enumerate(zip(step.prompt_logprobs, step.prompt_top_logprobs))]
        if step.cached_tokens is not None:
            req.cached_tokens = step.cached_tokens
        deltas = []
        for u in step.updates:
            tr = req.tracks[u.index]
            if tr.finish_reason is not None:
                continue
            new_text = ""
            for tok, lp, top in zip(u.new_token_ids, u.new_logprobs, u.new_top_logprobs):
                tr.token_ids.append(tok)
                tr.cumulative += lp
                if req.params.logprobs is not None:
                    tr.logprobs.append(self._logprob_dict(tok, lp, top))
                emit, stopped = tr.stops.feed(tr.detok.add(tok))
                new_text += emit
                if stopped:
                    matched = tr.stops.matched
                    assert matched is not None  # a stop is reported with the string it matched
                    if req.params.include_stop_str_in_output:
                        new_text += matched
                    tr.finish_reason, tr.stop_reason = "stop", matched
                    finish(req.request_id, u.index, "stop", matched)
                    break
            if tr.finish_reason is None and u.finish_reason is not None:
                emit, _ = tr.stops.feed(tr.detok.flush())
                new_text += emit + tr.stops.flush()
                tr.finish_reason, tr.stop_reason = u.finish_reason, u.stop_reason
            tr.text += new_text
            deltas.append(StreamDelta(u.index, new_text, list(u.new_token_ids), tr.finish_reason))
        return deltas

    def abort(self, req: RequestState) -> None:
        for tr in req.tracks:
            if tr.finish_reason is None:
                tr.finish_reason = "abort"

    def result(self, req: RequestState) -> RequestOutput:
        outs = [CompletionOutput(i, t.text, t.token_ids, t.cumulative,
                                 t.logprobs if req.params.logprobs is not None else None,
                                 t.finish_reason, t.stop_reason) for i, t in enumerate(req.tracks)]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, req.prompt_logprobs, outs, req.finished)

    def _logprob_dict(self, tok: int, lp: float, top: list[tuple[int, float]]) -> dict[int, Logprob]:
        d = {t: Logprob(v, rank, self.tokenizer.decode([t])) for rank, (t, v) in enumerate(top, 1)}
        if tok not in d:
            d[tok] = Logprob(lp, None, self.tokenizer.decode([tok]))
        return {tok: d.pop(tok), **d}  # the chosen token first, as vLLM lists it
