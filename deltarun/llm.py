"""The synchronous Python API, shaped like vLLM's offline `LLM`: generate, chat, and their streams.

Text lives here, at the edge: prompts are tokenized, the chat template rendered, generated ids
detokenized incrementally, stop strings applied and reasoning split from the answer. The engine
below speaks token ids only.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine.engine import Engine
from .outputs import ChatCompletion, ChatOutput, CompletionOutput, Logprob, RequestOutput, StreamDelta
from .processor.chat_template import ChatTemplate
from .processor.detokenizer import IncrementalDetokenizer, StopChecker
from .processor.reasoning import ReasoningParser, split_reasoning
from .processor.tokenizer import Tokenizer
from .sampling import SamplingParams, card_defaults
from .weights.hub import resolve_model
from .weights.loader import load_model

Prompt = str | list[int]
Messages = list[dict[str, Any]]
DEFAULT_MAX_TOKENS = 32768  # the model cards' recommended output length


@dataclass
class _Track:
    """Text-side state of one sequence: incremental detokenizer and stop-string matcher."""

    detok: IncrementalDetokenizer
    stops: StopChecker
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class LLM:
    """`LLM("qwen3.5:0.8b")`, `LLM("/path/to/folder", dtype="float32", device="cpu")`, `LLM("demo")`."""

    def __init__(self, model: str | Path = "qwen3.5:0.8b", *, dtype: str = "auto", device: str = "auto",
                 max_model_len: int | None = None, max_prefill_tokens: int = 512):
        self.path = resolve_model(model)
        self.model = load_model(self.path, dtype=dtype, device=device)
        self.config = self.model.config
        self.tokenizer = Tokenizer.from_folder(self.path)
        self.template = ChatTemplate.from_folder(self.path) or ChatTemplate.builtin(
            thinking_default=self.config.text.hidden_size >= 2560)
        self.engine = Engine(self.model, eos_token_ids=self.tokenizer.eos_token_ids,
                             valid_vocab=self.tokenizer.vocab_size, max_prefill_tokens=max_prefill_tokens,
                             max_model_len=max_model_len)
        self._ids = itertools.count()

    # -- plain generation ---------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One `RequestOutput` per prompt (a string or a list of token ids); params one or per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        results = []
        try:
            for p, sp in zip(prompts, plist):
                results.append(self._start(p, sp))
        except Exception:
            for r in results:
                self.engine.abort(r.request_id)
            raise
        by_id = {r.request_id: r for r in results}
        while self.engine.has_unfinished():
            for step in self.engine.step():
                if step.request_id in by_id:
                    self._update(by_id[step.request_id], step)
        return [self._result(r) for r in results]

    def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield new text as it is generated. Closing the iterator (or Ctrl-C) aborts the request."""
        req = self._start(prompt, params)
        try:
            while not req.finished:
                for step in self.engine.step():
                    if step.request_id != req.request_id:
                        continue
                    for delta in self._update(req, step):
                        yield delta
        finally:
            if not req.finished:
                self.engine.abort(req.request_id)

    # -- chat -------------------------------------------------------------------------------------
    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None, *,
             enable_thinking: bool | None = None, tools: list[dict] | None = None,
             **template_kwargs: Any) -> ChatOutput | list[ChatOutput]:
        """Answer one conversation (or a list of them); the reasoning comes back apart from the answer."""
        batch = bool(messages) and isinstance(messages[0], list)
        convs = messages if batch else [messages]
        rendered = [self._render(c, enable_thinking, tools, template_kwargs) for c in convs]
        outs = self.generate([ids for _, ids, _ in rendered],
                             [self._chat_params(params, thinking) for _, _, thinking in rendered])
        results = []
        for (prompt, ids, _), out in zip(rendered, outs):
            in_think = prompt.endswith("<think>\n")
            comps = []
            for c in out.outputs:
                reasoning, content = split_reasoning(c.text, in_think)
                comps.append(ChatCompletion(c.index, content, reasoning, c.token_ids, c.finish_reason, c.text))
            results.append(ChatOutput(out.request_id, prompt, ids, comps))
        return results if batch else results[0]

    def chat_stream(self, messages: Messages, params: SamplingParams | None = None, *,
                    enable_thinking: bool | None = None, tools: list[dict] | None = None,
                    **template_kwargs: Any) -> Iterator[StreamDelta]:
        """Stream one conversation's answer; each delta says which part is reasoning and which content."""
        prompt, ids, thinking = self._render(messages, enable_thinking, tools, template_kwargs)
        parsers: dict[int, ReasoningParser] = {}
        for delta in self.generate_stream(ids, self._chat_params(params, thinking)):
            parser = parsers.setdefault(delta.index, ReasoningParser(in_think=prompt.endswith("<think>\n")))
            delta.reasoning, delta.content = parser.feed(delta.text)
            if delta.finish_reason is not None:
                r, c = parser.finish()
                delta.reasoning += r
                delta.content += c
            yield delta

    def _render(self, messages: Messages, enable_thinking: bool | None, tools: list[dict] | None,
                kwargs: dict) -> tuple[str, list[int], bool]:
        prompt = self.template.render(messages, tools=tools, add_generation_prompt=True,
                                      enable_thinking=enable_thinking, **kwargs)
        thinking = self.template.thinking_default if enable_thinking is None else enable_thinking
        return prompt, self.tokenizer.encode(prompt), thinking

    @staticmethod
    def _chat_params(params: SamplingParams | None, thinking: bool) -> SamplingParams:
        return (params or SamplingParams()).with_defaults(card_defaults(thinking))

    # -- bookkeeping ------------------------------------------------------------------------------
    def _start(self, prompt: Prompt, params: SamplingParams | None) -> "_Req":
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        room = self.engine.max_model_len - len(ids)
        params = params.with_defaults({"max_tokens": max(0, min(DEFAULT_MAX_TOKENS, room))})
        req = _Req(str(next(self._ids)), prompt if isinstance(prompt, str) else None, ids, params)
        req.tracks = [_Track(IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                             StopChecker(params.stop)) for _ in range(params.n)]
        self.engine.add_request(req.request_id, ids, params)
        return req

    def _update(self, req: "_Req", step) -> list[StreamDelta]:
        if step.prompt_logprobs is not None:
            req.prompt_logprobs = self._logprob_dicts(step.prompt_logprobs, step.prompt_top_logprobs,
                                                      req.prompt_ids)
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
                    if req.params.include_stop_str_in_output:
                        new_text += tr.stops.matched
                    tr.finish_reason, tr.stop_reason = "stop", tr.stops.matched
                    self.engine.finish(req.request_id, u.index, "stop", tr.stops.matched)
                    break
            if tr.finish_reason is None and u.finish_reason is not None:
                emit, _ = tr.stops.feed(tr.detok.flush())
                new_text += emit + tr.stops.flush()
                tr.finish_reason, tr.stop_reason = u.finish_reason, u.stop_reason
            tr.text += new_text
            deltas.append(StreamDelta(u.index, new_text, list(u.new_token_ids), tr.finish_reason))
        return deltas

    def _logprob_dict(self, tok: int, lp: float, top: list[tuple[int, float]]) -> dict[int, Logprob]:
        d = {t: Logprob(v, rank, self.tokenizer.decode([t])) for rank, (t, v) in enumerate(top, 1)}
        if tok not in d:
            d[tok] = Logprob(lp, None, self.tokenizer.decode([tok]))
        return {tok: d.pop(tok), **d}  # the chosen token first, as vLLM lists it

    def _logprob_dicts(self, lps, tops, prompt_ids) -> list[dict[int, Logprob] | None]:
        out: list[dict[int, Logprob] | None] = []
        for i, (lp, top) in enumerate(zip(lps, tops)):
            out.append(None if lp is None else self._logprob_dict(prompt_ids[i], lp, top or []))
        return out

    def _result(self, req: "_Req") -> RequestOutput:
        outs = [CompletionOutput(i, t.text, t.token_ids, t.cumulative,
                                 t.logprobs if req.params.logprobs is not None else None,
                                 t.finish_reason, t.stop_reason) for i, t in enumerate(req.tracks)]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, req.prompt_logprobs, outs, req.finished)


@dataclass
class _Req:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    tracks: list[_Track] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(t.finish_reason is not None for t in self.tracks)
