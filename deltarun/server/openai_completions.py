"""OpenAI legacy completions (`POST /v1/completions`) and `GET /v1/models` (every local model).

Prompts are text or token ids (one or a batch). `echo` + `logprobs` + `max_tokens: 0` returns the
prompt's own log-probs, which is what log-likelihood evaluation harnesses (lm-eval) ask for.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..client import EngineClient
from ..outputs import Logprob
from ..processor.output import RequestState
from .common import add_structured, check_length, new_id, sampling
from .errors import APIError
from .openai import sse, sse_error
from .protocol import CompletionRequest
from .state import ServerState, deadline
from .streaming import run_request, run_to_end, until_disconnect, with_error_event

router = APIRouter()


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [cast(list[int], list(p))]
    return cast(list[str | list[int]], list(p))


class _LogprobsBuilder:
    """Completions-style logprobs: tokens, token_logprobs, top_logprobs (token → logprob), text_offset."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tok = tokenizer
        self.offset = offset
        self.data: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, tok_id: int, d: dict[int, Logprob] | None, k: int) -> None:
        text = self.tok.decode([tok_id])
        self.data["tokens"].append(text)
        self.data["text_offset"].append(self.offset)
        self.offset += len(text)
        if d is None:  # the first prompt token: nothing predicts it
            self.data["token_logprobs"].append(None)
            self.data["top_logprobs"].append(None)
            return
        self.data["token_logprobs"].append(d[tok_id].logprob if tok_id in d else None)
        top = sorted(((t, v) for t, v in d.items() if v.rank is not None), key=lambda x: cast(int, x[1].rank))[:k]
        self.data["top_logprobs"].append({(v.decoded_token or ""): v.logprob for t, v in top})


def _echo_prefix(llm: EngineClient, req: RequestState, k: int | None) -> tuple[str, _LogprobsBuilder | None]:
    text = req.prompt if req.prompt is not None else llm.tokenizer.decode(req.prompt_ids)
    if k is None:
        return text, None
    b = _LogprobsBuilder(llm.tokenizer)
    plps = req.prompt_logprobs or [None] * len(req.prompt_ids)
    for tok, d in zip(req.prompt_ids, plps):
        b.add(tok, d, k)
    return text, b


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state: ServerState = request.app.state.server
    llm = await state.use(request, body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of is not supported (use n)", param="best_of")
    k = body.logprobs
    reqs: list[RequestState] = []
    for p in _prompts(body):
        ids = llm.tokenizer.encode(p) if isinstance(p, str) else p
        check_length(llm, len(ids), body.max_tokens)
        params = sampling(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          min_p=body.min_p, presence_penalty=body.presence_penalty,
                          frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                          seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids,
                          max_tokens=body.max_tokens, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                          logprobs=k, prompt_logprobs=k if body.echo and k is not None else None)
        rf = body.response_format
        params = add_structured(llm, params, rf.type if rf else None,
                                (rf.json_schema or {}).get("schema") if rf else None, False)
        reqs.append(llm.prepare(p, params))
    rid, created = new_id("cmpl-"), int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}

    def usage() -> dict[str, int]:
        p = sum(len(r.prompt_ids) for r in reqs)
        g = sum(len(t.token_ids) for r in reqs for t in r.tracks)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    if body.stream:
        async def stream() -> AsyncIterator[str]:
            for pi, req in enumerate(reqs):  # several prompts stream one after the other
                sent = [0] * body.n
                echoed = [False] * body.n
                async with aclosing(run_request(llm, req, deadline(request))) as steps:
                    async for deltas in steps:
                        for d in deltas:
                            text, lp, b = d.text, None, None
                            if body.echo and not echoed[d.index]:
                                prefix, b = _echo_prefix(llm, req, k)
                                text, echoed[d.index] = prefix + text, True
                            if k is not None:
                                track = req.tracks[d.index]
                                b = b or _LogprobsBuilder(llm.tokenizer)
                                for tok, dd in zip(track.token_ids[sent[d.index]:], track.logprobs[sent[d.index]:]):
                                    b.add(tok, dd, k)
                                sent[d.index] = len(track.logprobs)
                                lp = b.data
                            yield sse({**head, "choices": [{"index": pi * body.n + d.index, "text": text,
                                                            "logprobs": lp, "finish_reason": d.finish_reason}]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(with_error_event(request, stream(), sse_error), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    await until_disconnect(request, asyncio.gather(*(run_to_end(llm, r, deadline(request)) for r in reqs)))
    choices = []
    for pi, req in enumerate(reqs):
        for i, track in enumerate(req.tracks):
            text, b = _echo_prefix(llm, req, k) if body.echo else ("", None)
            lp = None
            if k is not None:
                b = b or _LogprobsBuilder(llm.tokenizer)
                for tok, d in zip(track.token_ids, track.logprobs):
                    b.add(tok, d, k)
                lp = b.data
            choices.append({"index": pi * body.n + i, "text": text + track.text, "logprobs": lp,
                            "finish_reason": track.finish_reason})
    return {**head, "choices": choices, "usage": usage()}


def _model_card(state: ServerState, name: str, max_model_len: int | None = None) -> dict:
    card = {"id": name, "object": "model", "created": state.created, "owned_by": "deltarun"}
    return {**card, "max_model_len": max_model_len} if max_model_len else card


@router.get("/v1/models")
async def models(request: Request):
    """Every model this server can run (as Ollama lists them): the loaded ones, then the other local ones."""
    from .manage import local_entries

    state: ServerState = request.app.state.server
    loaded = state.listed_loaded()
    data = [_model_card(state, e.name, e.llm.max_model_len) for e in loaded]
    names = {n for e in loaded for n in e.names}
    local = await asyncio.to_thread(local_entries, state.models.served())
    data += [_model_card(state, m["name"]) for m in local if m["name"] not in names]
    data += [_adapter_card(state, a) for a in state.models.adapters]
    return {"object": "list", "data": data}


def _adapter_card(state: ServerState, name: str) -> dict[str, Any]:
    """A LoRA adapter, as vLLM lists one: its base model as `parent` (and its own name as `root`, not a path)."""
    return {**_model_card(state, name), "root": name, "parent": state.models.adapters[name]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    state: ServerState = request.app.state.server
    if model_id in state.models.adapters:
        return _adapter_card(state, model_id)
    entry = state.models.find(model_id)
    if entry is not None and entry.llm is not None:
        return _model_card(state, model_id, entry.llm.max_model_len)
    await state.models.resolve(model_id)  # 404 with a hint when it is not a local model
    return _model_card(state, model_id)
