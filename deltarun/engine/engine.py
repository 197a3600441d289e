"""The engine loop over token ids: `add_request`, `abort`, `step()` = schedule → run → update.

Each step (1) decodes one token for every running sequence in ONE batched forward, after the scheduler
made sure their KV can grow within the memory budget (preempting the newest request when not: it is
recomputed later, never corrupted), and (2) prefills the next chunks of the waiting sequences
(≤ `max_prefill_tokens` in all, one packed forward), the waiting prompts taking turns, so a long prompt
never freezes the others. A new prompt first resumes from the deepest cached prefix (cache/prefix.py).
A request with `n > 1` prefills once and forks.
The scheduler (scheduler.py, pure Python) decides what runs; the runner (runner.py) does the tensor work;
with the checkpoint's MTP head (`mtp` on/auto) the runner's decode may draft and verify several tokens per
sequence (speculative.py). Text-level work (detokenizing, stop strings) is the caller's; it ends a
sequence via `finish`. Images/videos come as a `MultiModalInput` (inputs.py) on the request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import torch

from ..cache.prefix import PrefixCache
from ..inputs import MultiModalInput, SeqUpdate, StepOutput
from ..model.mtp import MTPHead
from ..model.qwen3_5 import Qwen3_5ForCausalLM
from ..sampling import SamplingParams
from .adapters import AdapterSet
from .memory import default_budgets
from .runner import ModelRunner
from .scheduler import Chunk, Memory, Scheduler
from .sequence import Request, Sequence
from .speculative import make_speculator


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # DeltaNet state slots: sequences that can hold state at once
    max_prefill_tokens: int = 512  # prompt tokens computed per step
    max_model_len: int | None = None  # context length (default: the model's)
    max_memory: int | None = None  # bytes for running sequences' KV + states (default: from free RAM)
    prefix_cache_memory: int | None = None  # bytes for prefix snapshots (default: from free RAM; 0 = off)
    prefix_block: int = 64  # prefix reuse granularity (tokens)
    mtp: str = "auto"  # speculative decoding with the MTP head: "on" | "off" | "auto" (only while it pays)
    num_speculative_tokens: int = 2  # drafts per step (engine/speculative.py)
    # MTP drafts over the first N token ids only (0 = all; ignored when the vocabulary is not larger). BPE ids
    # are merge-ranked, frequent first: 32K cover 92–94% of English and code tokens (76% CJK) and make a draft
    # step read 32K lm_head rows instead of 248K (a third of the 0.8B's weights); EAGLE-3 drafts over 32K too.
    mtp_draft_vocab: int = 32768
    kv_cache_dtype: str = "auto"  # "int8": keys/values held as int8 + a scale per head and token
    max_loras: int = 4  # LoRA adapters one batch may mix (engine/adapters.py)
    max_cpu_loras: int | None = None  # adapters kept read in memory (default: max_loras)
    max_lora_rank: int | None = None  # adapters of a higher rank are refused (default: any)


class StepFailed(RuntimeError):
    """One phase of a step raised. Its requests (`request_ids`) are aborted, their state freed; `outputs`
    are what the step did for the other requests (deliver them as usual); `error` is what was raised."""

    def __init__(self, request_ids: list[str], outputs: list[StepOutput], error: Exception):
        super().__init__(f"a step failed for {len(request_ids)} request(s): {error!r}")
        self.request_ids, self.outputs, self.error = request_ids, outputs, error


class Engine:
    def __init__(self, model: Qwen3_5ForCausalLM, *, eos_token_ids: list[int], valid_vocab: int | None = None,
                 config: EngineConfig | None = None, vision: torch.nn.Module | None = None,
                 mtp: MTPHead | None = None, **overrides):
        self.model = model
        self.cfg = cfg = config or EngineConfig(**overrides)
        self.eos_token_ids = list(eos_token_ids)
        vocab = model.config.text.vocab_size
        self.valid_vocab = min(valid_vocab or vocab, vocab)
        self.max_model_len = cfg.max_model_len or model.config.text.max_position_embeddings
        self.pool = model.new_pool(cfg.max_num_seqs)
        t = model.config.text
        if cfg.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be auto or int8, not {cfg.kv_cache_dtype!r}")
        kv_int8 = cfg.kv_cache_dtype == "int8"
        per_head = t.head_dim + 4 if kv_int8 else t.head_dim * model.dtype.itemsize  # int8 + fp32 scale
        self.kv_token_bytes = model.num_kv_layers * 2 * t.num_key_value_heads * per_head
        auto_run, auto_prefix = default_budgets(model.device)
        self.max_memory = cfg.max_memory if cfg.max_memory is not None else auto_run
        self.prefix = PrefixCache(cfg.prefix_cache_memory if cfg.prefix_cache_memory is not None else auto_prefix,
                                  cfg.prefix_block)
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "preemptions": 0, "steps": 0,
                      "vision_encodes": 0, "forwards": 0}
        self.adapters = AdapterSet(model, cfg.max_loras, cfg.max_cpu_loras, cfg.max_lora_rank)
        self.runner = ModelRunner(model, self.pool, self.prefix, eos_token_ids=self.eos_token_ids,
                                  valid_vocab=self.valid_vocab, kv_int8=kv_int8, vision=vision, stats=self.stats,
                                  check_stop=lambda seq, tok: self.scheduler.check_stop(seq, tok))
        self.spec = self.runner.spec = make_speculator(self.runner, mtp, cfg)  # None: plain decoding
        self.runner.adapters = self.adapters
        self.scheduler = Scheduler(self.pool, Memory(self.max_memory, self.kv_token_bytes, model.num_kv_layers),
                                   max_prefill_tokens=cfg.max_prefill_tokens, block=cfg.prefix_block,
                                   lookahead=1 + (self.spec.k if self.spec is not None else 0),
                                   eos_token_ids=self.eos_token_ids, start=self.runner.start, stats=self.stats,
                                   admissible=self.adapters.admissible)

    @property
    def vision(self) -> torch.nn.Module | None:
        return self.runner.vision

    @vision.setter
    def vision(self, tower: torch.nn.Module | None) -> None:
        self.runner.vision = tower

    @property
    def requests(self) -> dict[str, Request]:
        return self.scheduler.requests

    @property
    def queue(self):
        """Sequences waiting for (more) prefill, in the order the scheduling policy sees them."""
        return self.scheduler.waiting

    @property
    def active(self) -> list[Sequence]:
        """Sequences holding a state slot."""
        return self.scheduler.running

    # -- requests -------------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams, mm: MultiModalInput | None = None) -> None:
        """Raise ValueError (a clear, user-facing message) for a request the engine cannot run."""
        if mm is not None:
            if self.vision is None:
                raise ValueError("this model has no vision tower: it cannot read images or videos")
            if mm.num_prompt != len(prompt_ids):
                raise ValueError(f"the multimodal positions cover {mm.num_prompt} tokens but the prompt has "
                                 f"{len(prompt_ids)}")
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.text.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            media = f" ({mm.num_vision_tokens} of them for images/videos)" if mm is not None else ""
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens{media}, but the context length is "
                             f"{self.max_model_len}; shorten it{', use fewer or smaller media' if media else ''} "
                             "or raise the context length")
        if params.n > self.pool.num_slots:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.pool.num_slots}")
        params.validate()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    mm: MultiModalInput | None = None, adapter: str | None = None) -> None:
        """Queue a prompt. `params` must already carry defaults (`SamplingParams.with_defaults`).
        `mm`: the prompt's images/videos (from `prepare_media`, whose expanded ids are `prompt_ids`).
        `adapter`: the name of a registered LoRA adapter (`adapters.register`) to run it with; None: the base."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"unknown adapter {adapter!r}: register it first")
        self.check_request(prompt_ids, params, mm)
        req = Request(request_id, [int(t) for t in prompt_ids], params, self.max_model_len,
                      self.scheduler.next_arrival(), mm=mm, adapter=adapter)
        req.seqs = [Sequence(0, req, self.runner.sampler(req, 0))]
        self.scheduler.add(req)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def finish(self, request_id: str, index: int, reason: str, stop_reason: int | str | None = None) -> None:
        """End one sequence early (the caller found a stop string); frees its state."""
        self.scheduler.finish(request_id, index, reason, stop_reason)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.active if s.decoding)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the loop ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One decode batch and one prefill forward. If a phase raises, only that phase's requests fail:
        they are aborted (their slots freed) and `StepFailed` carries the error and the other requests'
        outputs; requests outside the phase (waiting ones, the decode batch when the prefill fails) go on."""
        outputs: dict[str, StepOutput] = {}
        self.stats["steps"] += 1
        decode = self.scheduler.schedule_decode()
        if decode:
            try:
                self.runner.decode(decode, outputs)
            except Exception as e:
                self._fail_phase({s.request.request_id for s in decode}, outputs, e)
            self.scheduler.reap()
        chunks = self.scheduler.schedule_prefill()
        if chunks:
            try:
                hidden = self.runner.prefill(chunks)
                done = [(c, h) for c, h in zip(chunks, hidden) if c.last]
                for c, _ in done:
                    self.scheduler.prefilled(c.seq)
                # fresh prompts (not resumed sequences): their first tokens
                self._first_tokens([(c, h) for c, h in done if not c.seq.token_ids], outputs)
            except Exception as e:
                self._fail_phase({c.seq.request.request_id for c in chunks}, outputs, e)
            self.scheduler.reap()
        return self._collect(outputs)

    def _collect(self, outputs: dict[str, StepOutput]) -> list[StepOutput]:
        """The step's outputs, each marked finished (and its request forgotten) when its request is done."""
        for out in outputs.values():
            req = self.requests.get(out.request_id)
            if req is not None and req.finished:
                out.finished = True
                self.requests.pop(out.request_id)
        return list(outputs.values())

    def _fail_phase(self, request_ids: set[str], outputs: dict[str, StepOutput], error: Exception) -> NoReturn:
        for rid in request_ids:
            outputs.pop(rid, None)
            self.abort(rid)  # frees every slot the request holds
        self.scheduler.reap()  # sequences of the other requests that finished before the phase raised
        raise StepFailed(sorted(request_ids), self._collect(outputs), error) from error

    def _first_tokens(self, done: list[tuple[Chunk, torch.Tensor]], outputs: dict[str, StepOutput]) -> None:
        """Prompts that just finished prefilling (each with its hidden states): fork each one's n − 1
        siblings, then sample every sequence's first token (one lm_head pass for all of them)."""
        rows: list[torch.Tensor] = []  # one per request: its n sequences sample from the same logits
        seqs: list[Sequence] = []
        which: list[int] = []
        for chunk, hidden in done:
            seq, req = chunk.seq, chunk.seq.request
            out = outputs.setdefault(req.request_id, StepOutput(req.request_id, []))
            out.prompt_logprobs, out.prompt_top_logprobs = (req.prompt_logprobs or None,
                                                            req.prompt_top_logprobs or None)
            out.cached_tokens = req.cached_tokens
            for i in range(1, req.params.n):
                self.scheduler.add_running(self.runner.fork(seq, i))
            if req.params.max_tokens == 0:
                for s in req.seqs:
                    s.finish_reason = "length"
                    out.updates.append(SeqUpdate(s.index, [], [], [], "length"))
                continue
            which += [len(rows)] * len(req.seqs)
            rows.append(hidden[-1])
            seqs += req.seqs
        if seqs:
            logits = self.model.logits(torch.stack(rows))
            self.runner.sample(logits if len(which) == len(rows) else logits[which], seqs, outputs)
