"""The engine loop over token ids: `add_request`, `abort`, `step()` = schedule → run → update.

Each step decodes one token for every running sequence and prefills the next chunk (at most
`max_prefill_tokens`) of the oldest waiting prompt, so a long prompt never freezes the others.
A request with `n > 1` prefills its prompt once and forks the cache into n sequences.
Text-level work (detokenizing, stop strings) is the caller's; it ends a sequence via `finish`.
"""
from __future__ import annotations

from collections import deque

import torch

from ..cache.state import clone_cache
from ..model.qwen3_5 import Qwen3_5ForCausalLM
from ..ops.sampling import SamplerState, prompt_logprobs, sample
from ..sampling import SamplingParams
from .sequence import Request, SeqUpdate, Sequence, Status, StepOutput

LOGITS_CHUNK = 256  # prompt positions per logits block: bounds the [T, vocab] fp32 buffer


class Engine:
    def __init__(self, model: Qwen3_5ForCausalLM, *, eos_token_ids: list[int], valid_vocab: int | None = None,
                 max_prefill_tokens: int = 512, max_model_len: int | None = None):
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        vocab = model.config.text.vocab_size
        self.valid_vocab = min(valid_vocab or vocab, vocab)
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len or model.config.text.max_position_embeddings
        self.requests: dict[str, Request] = {}
        self.waiting: deque[str] = deque()

    # -- requests -------------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (a clear, user-facing message) for a request the engine cannot run."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.text.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, but the context length is "
                             f"{self.max_model_len}; shorten it or raise the context length")
        params.validate()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a prompt. `params` must already carry defaults (`SamplingParams.with_defaults`)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        req = Request(request_id, [int(t) for t in prompt_ids], params, self.max_model_len)
        self.requests[request_id] = req
        self.waiting.append(request_id)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and request_id in self.waiting:
            self.waiting.remove(request_id)

    def finish(self, request_id: str, index: int, reason: str, stop_reason: int | str | None = None) -> None:
        """End one sequence early (the caller found a stop string); frees its state."""
        req = self.requests.get(request_id)
        if req is None or index >= len(req.seqs):
            return
        seq = req.seqs[index]
        if not seq.finished:
            seq.finish_reason, seq.stop_reason, seq.cache = reason, stop_reason, None
        if req.finished:
            self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the loop ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs: dict[str, StepOutput] = {}
        running = [(req, seq) for req in self.requests.values() if req.status is Status.RUNNING
                   for seq in req.seqs if not seq.finished]
        if running:
            self._decode(running, outputs)
        if self.waiting:
            self._prefill_chunk(self.requests[self.waiting[0]], outputs)
        for out in outputs.values():
            req = self.requests.get(out.request_id)
            if req is not None and req.finished:
                out.finished = True
                self.requests.pop(out.request_id)
        return list(outputs.values())

    def _decode(self, running: list[tuple[Request, Sequence]], outputs: dict[str, StepOutput]) -> None:
        # One forward per sequence for now; batched decode over the hybrid cache is the engine issue.
        rows = []
        for _, seq in running:
            ids = torch.tensor([[seq.token_ids[-1]]], device=self.model.device)
            rows.append(self.model.logits(self.model(ids, seq.cache)[:, -1]))
        self._sample(torch.cat(rows), running, outputs)

    def _prefill_chunk(self, req: Request, outputs: dict[str, StepOutput]) -> None:
        if not req.seqs:
            req.seqs = [Sequence(0, self._sampler(req, 0), self.model.new_cache())]
        cache = req.seqs[0].cache
        start = req.num_prefilled
        end = min(len(req.prompt_ids), start + self.max_prefill_tokens)
        ids = torch.tensor([req.prompt_ids[start:end]], device=self.model.device)
        hidden = self.model(ids, cache)[0]  # [T, H]
        req.num_prefilled = end
        done = end == len(req.prompt_ids)
        if req.params.prompt_logprobs is not None:
            self._prompt_logprobs(req, hidden, start, done)
        if not done:
            return
        self.waiting.popleft()
        req.status = Status.RUNNING
        out = outputs.setdefault(req.request_id, StepOutput(req.request_id, []))
        out.prompt_logprobs, out.prompt_top_logprobs = req.prompt_logprobs or None, req.prompt_top_logprobs or None
        for i in range(1, req.params.n):
            req.seqs.append(Sequence(i, self._sampler(req, i), clone_cache(cache)))
        if req.params.max_tokens == 0:
            for seq in req.seqs:
                seq.finish_reason, seq.cache = "length", None
                out.updates.append(SeqUpdate(seq.index, [], [], [], "length"))
            return
        last = self.model.logits(hidden[-1:])
        self._sample(last.expand(len(req.seqs), -1), [(req, s) for s in req.seqs], outputs)

    def _prompt_logprobs(self, req: Request, hidden: torch.Tensor, start: int, done: bool) -> None:
        if start == 0:
            req.prompt_logprobs.append(None)  # nothing predicts the first token
            req.prompt_top_logprobs.append(None)
        n = hidden.shape[0] - (1 if done else 0)  # the prompt's last position predicts no prompt token
        k = req.params.prompt_logprobs
        for a in range(0, n, LOGITS_CHUNK):
            b = min(n, a + LOGITS_CHUNK)
            nxt = torch.tensor(req.prompt_ids[start + a + 1 : start + b + 1], device=hidden.device)
            lp, top = prompt_logprobs(self.model.logits(hidden[a:b]), nxt, k)
            req.prompt_logprobs.extend(lp.tolist())
            req.prompt_top_logprobs.extend(top if k else [[] for _ in range(b - a)])

    def _sampler(self, req: Request, index: int) -> SamplerState:
        params = req.params
        if params.seed is not None and index:
            # n samples from one seed must differ from each other yet stay reproducible
            params = SamplingParams(**{**params.__dict__, "seed": params.seed + index})
        return SamplerState(params, req.prompt_ids, self.model.config.text.vocab_size, self.model.device,
                            eos_token_ids=self.eos_token_ids)

    def _sample(self, logits: torch.Tensor, batch: list[tuple[Request, Sequence]],
                outputs: dict[str, StepOutput]) -> None:
        logits = logits.clone()
        logits[:, self.valid_vocab:] = float("-inf")  # padding rows of the embedding are not tokens
        result = sample(logits, [seq.sampler for _, seq in batch])
        for row, (req, seq) in enumerate(batch):
            tok = int(result.token_ids[row])
            lp = float(result.logprobs[row])
            top = result.top_logprobs[row] if result.top_logprobs is not None else []
            seq.token_ids.append(tok)
            seq.logprobs.append(lp)
            seq.top_logprobs.append(top)
            seq.sampler.append(tok)
            self._check_stop(req, seq, tok)
            out = outputs.setdefault(req.request_id, StepOutput(req.request_id, []))
            out.updates.append(SeqUpdate(seq.index, [tok], [lp], [top], seq.finish_reason, seq.stop_reason))

    def _check_stop(self, req: Request, seq: Sequence, tok: int) -> None:
        p = req.params
        if len(seq.token_ids) >= p.min_tokens:
            if tok in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", tok
            elif not p.ignore_eos and tok in self.eos_token_ids:
                seq.finish_reason = "stop"
        if seq.finish_reason is None:
            if p.max_tokens is not None and len(seq.token_ids) >= p.max_tokens:
                seq.finish_reason = "length"
            elif len(req.prompt_ids) + len(seq.token_ids) >= req.max_len:
                seq.finish_reason = "length"
        if seq.finished:
            seq.cache = None
