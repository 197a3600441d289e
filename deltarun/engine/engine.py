"""The engine loop over token ids: `add_request`, `abort`, `step()` = schedule → run → update.

Each step (1) makes sure the running sequences' KV can grow within the memory budget, preempting the
newest request when not (it is recomputed later, never corrupted), (2) decodes one token for every
running sequence in ONE batched forward, and (3) prefills the next chunk (≤ `max_prefill_tokens`) of
the oldest waiting sequence, so a long prompt never freezes the others. A new prompt first resumes
from the deepest cached prefix (cache/prefix.py). A request with `n > 1` prefills once and forks.
Text-level work (detokenizing, stop strings) is the caller's; it ends a sequence via `finish`.
With the checkpoint's MTP head (`mtp` on/auto), a decode step may draft and verify several tokens per
sequence: engine/speculative.py, behind `_decode`, `on_prefill` and `fork` hooks.

Images and videos: a request may carry a `MultiModalInput` (processor/multimodal.py). The vision tower
runs once for it, lazily, when the first chunk holding vision tokens is prefilled; each chunk embeds its
own tokens and scatters in the vision rows that fall in it, with the prompt's M-RoPE positions; decode
uses position index + delta. Prefix-cache keys see each vision token as its media's digest.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import torch

from ..cache.prefix import PrefixCache
from ..cache.state import GROWTH, KVCache, ModelCache, SeqState
from ..inputs import MAX_ENCODE_PATCHES, MultiModalInput, SeqUpdate, StepOutput
from ..model.qwen3_5 import Qwen3_5ForCausalLM
from ..ops.sampling import SamplerState, prompt_logprobs, sample
from ..sampling import SamplingParams
from .memory import default_budgets
from .sequence import Request, Sequence
from .speculative import make_speculator

LOGITS_CHUNK = 256  # prompt positions per logits block: bounds the [T, vocab] fp32 buffer


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


class Engine:
    def __init__(self, model: Qwen3_5ForCausalLM, *, eos_token_ids: list[int], valid_vocab: int | None = None,
                 config: EngineConfig | None = None, vision: torch.nn.Module | None = None,
                 mtp: torch.nn.Module | None = None, **overrides):
        self.model = model
        self.vision = vision  # the vision tower (may be set later: front ends load it on first use)
        self.cfg = cfg = config or EngineConfig(**overrides)
        self.eos_token_ids = list(eos_token_ids)
        vocab = model.config.text.vocab_size
        self.valid_vocab = min(valid_vocab or vocab, vocab)
        self.max_prefill_tokens = cfg.max_prefill_tokens
        self.max_model_len = cfg.max_model_len or model.config.text.max_position_embeddings
        self.pool = model.new_pool(cfg.max_num_seqs)
        t = model.config.text
        if cfg.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be auto or int8, not {cfg.kv_cache_dtype!r}")
        self.kv_int8 = cfg.kv_cache_dtype == "int8"
        per_head = t.head_dim + 4 if self.kv_int8 else t.head_dim * model.dtype.itemsize  # int8 + fp32 scale
        self.kv_token_bytes = model.num_kv_layers * 2 * t.num_key_value_heads * per_head
        auto_run, auto_prefix = default_budgets(model.device)
        self.max_memory = cfg.max_memory if cfg.max_memory is not None else auto_run
        self.prefix = PrefixCache(cfg.prefix_cache_memory if cfg.prefix_cache_memory is not None else auto_prefix,
                                  cfg.prefix_block)
        self.requests: dict[str, Request] = {}
        self.queue: deque[Sequence] = deque()  # sequences waiting for (more) prefill, oldest first
        self.active: list[Sequence] = []  # sequences holding a state slot
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "preemptions": 0, "steps": 0,
                      "vision_encodes": 0}
        self._arrivals = itertools.count()
        self.spec = make_speculator(self, mtp, cfg)  # None: plain decoding (off, or no MTP head)

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
                    mm: MultiModalInput | None = None) -> None:
        """Queue a prompt. `params` must already carry defaults (`SamplingParams.with_defaults`).
        `mm`: the prompt's images/videos (from `prepare_media`, whose expanded ids are `prompt_ids`)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params, mm)
        req = Request(request_id, [int(t) for t in prompt_ids], params, self.max_model_len, next(self._arrivals),
                      mm=mm)
        req.seqs = [Sequence(0, req, self._sampler(req, 0))]
        self.requests[request_id] = req
        self.queue.append(req.seqs[0])

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        for seq in req.seqs if req else []:
            if not seq.finished:
                seq.finish_reason = "abort"
            self._drop(seq)

    def finish(self, request_id: str, index: int, reason: str, stop_reason: int | str | None = None) -> None:
        """End one sequence early (the caller found a stop string); frees its state."""
        req = self.requests.get(request_id)
        if req is None or index >= len(req.seqs):
            return
        seq = req.seqs[index]
        if not seq.finished:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._drop(seq)
        if req.finished:
            self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.active if s.decoding)

    @property
    def num_waiting(self) -> int:
        return len(self.queue)

    # -- the loop ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs: dict[str, StepOutput] = {}
        self.stats["steps"] += 1
        self._make_room_for_decode()
        decode = [s for s in self.active if s.decoding]
        if decode:
            self._decode(decode, outputs)
        if self.queue:
            self._prefill_chunk(self.queue[0], outputs)
        for out in outputs.values():
            req = self.requests.get(out.request_id)
            if req is not None and req.finished:
                out.finished = True
                self.requests.pop(out.request_id)
        return list(outputs.values())

    def _decode(self, seqs: list[Sequence], outputs: dict[str, StepOutput]) -> None:
        if self.spec is not None:
            return self.spec.decode(seqs, outputs)  # drafts + verifies, or calls plain_decode
        self.plain_decode(seqs, outputs)

    def plain_decode(self, seqs: list[Sequence], outputs: dict[str, StepOutput]) -> None:
        dev = self.model.device
        ids = torch.tensor([[s.token_ids[-1]] for s in seqs], device=dev)
        positions = None
        if any(s.request.mm is not None for s in seqs):  # rows after an image run at index + delta
            pos = [s.num_computed + (s.request.mm.delta if s.request.mm is not None else 0) for s in seqs]
            positions = torch.tensor(pos, device=dev).view(1, -1, 1).expand(3, -1, 1)
        hidden = self.model(ids, ModelCache(self.pool, [s.state for s in seqs]), positions=positions)
        for s in seqs:
            s.num_computed += 1
        self._sample(self.model.logits(hidden[:, -1]), seqs, outputs)

    def _prefill_chunk(self, seq: Sequence, outputs: dict[str, StepOutput]) -> None:
        req = seq.request
        if seq.state is None and not self._admit(seq):
            return  # waits for memory or a slot
        target, start = seq.prefill_target, seq.num_computed
        end = min(start + self.max_prefill_tokens, target)
        blk = self.prefix.block
        if end < target and end // blk * blk > start:  # chunk ends on block boundaries: snapshot points
            end = end // blk * blk
        if start < target // blk * blk < end:  # and one at the last boundary before the prompt's end
            end = target // blk * blk
        if start >= target:  # a resumed sequence restored whole from the prefix cache
            self.queue.popleft()
            return
        ids = torch.tensor([seq.inputs[start:end]], device=self.model.device)
        cache = ModelCache(self.pool, [seq.state])
        if req.mm is None:
            hidden = self.model(ids, cache)[0]  # [T, H]
        else:
            positions = req.mm.positions_for(start, end)[:, None].to(self.model.device)
            hidden = self.model(None, cache, positions=positions, inputs_embeds=self._embed(req, ids, start, end))[0]
        seq.num_computed = end
        self.stats["prompt_tokens"] += end - start
        if self.spec is not None:
            self.spec.on_prefill(seq, hidden, start)  # the MTP head's context
        if end % blk == 0 and self.prefix.budget > 0:
            self.prefix.insert(seq.key_inputs, end, self.pool.snapshot(seq.state.slot), seq.state.kv)
        if req.vision_embeds is not None and all(s.num_computed >= req.mm.num_prompt for s in req.seqs
                                                 if not s.finished):
            req.vision_embeds = None  # every vision token is in the state now
        fresh = not seq.token_ids
        if fresh and req.params.prompt_logprobs is not None:
            self._prompt_logprobs(req, hidden, start, end == target)
        if end < target:
            return
        self.queue.popleft()
        if not fresh:
            return  # a resumed sequence: its newest token is decoded next step
        out = outputs.setdefault(req.request_id, StepOutput(req.request_id, []))
        out.prompt_logprobs, out.prompt_top_logprobs = req.prompt_logprobs or None, req.prompt_top_logprobs or None
        for i in range(1, req.params.n):
            child = Sequence(i, req, self._sampler(req, i), num_computed=seq.num_computed)
            child.state = self._new_state(target + 1)
            self.pool.copy_slot(seq.state.slot, child.state.slot)
            for dst, src in zip(child.state.kv, seq.state.kv):
                dst.copy_prefix(src, src.length)
            child.state.length = seq.state.length
            if self.spec is not None:
                self.spec.fork(seq, child)
            req.seqs.append(child)
            self.active.append(child)
        if req.params.max_tokens == 0:
            for s in req.seqs:
                s.finish_reason = "length"
                self._drop(s)
                out.updates.append(SeqUpdate(s.index, [], [], [], "length"))
            return
        last = self.model.logits(hidden[-1:])
        self._sample(last.expand(len(req.seqs), -1), req.seqs, outputs)

    def _embed(self, req: Request, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Embeddings [1, T, H] of inputs start … end−1 with the vision rows of the tokens among them."""
        x = self.model.model.language_model.embed_tokens(ids)
        a, b = req.mm.rows(start, end)
        if a < b:
            if req.vision_embeds is None:  # once per request, and only if a chunk needs it (not on a hit)
                req.vision_embeds = encode_vision(self.vision, req.mm)
                self.stats["vision_encodes"] += 1
            idx = (req.mm.vision_index[a:b] - start).to(x.device)
            x[0, idx] = req.vision_embeds[a:b].to(device=x.device, dtype=x.dtype)
        return x

    # -- memory ---------------------------------------------------------------------------------
    def _usage(self) -> int:
        return sum(s.state.kv_nbytes() for s in self.active) + len(self.active) * self.pool.slot_nbytes()

    def _admit(self, seq: Sequence) -> bool:
        req = seq.request
        slots_needed = req.params.n if not seq.token_ids else 1
        if len(self.pool.free_slots) < slots_needed:
            return False
        need = self.kv_token_bytes * (seq.prefill_target + 1) * slots_needed
        if self.active and self._usage() + need > self.max_memory:
            return False  # requests beyond the budget wait; alone, a request always runs
        seq.state = self._new_state(seq.prefill_target + 1)
        self.active.append(seq)
        fresh = not seq.token_ids
        if not (fresh and req.params.prompt_logprobs is not None):  # a hit skips the prefix's logits
            # a fresh prompt must compute ≥ 1 token: its last position's logits give the first sample
            hit = self.prefix.lookup(seq.key_inputs, seq.prefill_target - (1 if fresh else 0))
            if hit is not None:
                self.pool.restore(seq.state.slot, hit.snapshot)
                for dst, src in zip(seq.state.kv, hit.kv):
                    dst.copy_prefix(src, hit.length)
                seq.num_computed = seq.state.length = hit.length
        return True

    def _new_state(self, capacity: int) -> SeqState:
        t = self.model.config.text
        kv = []
        for _ in range(self.model.num_kv_layers):
            c = KVCache(quantized=self.kv_int8)
            like = torch.empty(1, t.num_key_value_heads, 0, t.head_dim, dtype=self.model.dtype,
                               device=self.model.device)
            c.reserve(capacity, like)
            kv.append(c)
        return SeqState(self.pool.alloc(), kv)

    def _make_room_for_decode(self) -> None:
        """Preempt the newest requests while the next decode's KV growth would exceed the budget."""
        layer_token_bytes = self.kv_token_bytes // max(1, self.model.num_kv_layers)
        step = 1 + (self.spec.k if self.spec is not None else 0)  # KV positions one decode may add
        while True:
            growth = 0
            for s in self.active:
                if s.decoding:
                    for c in s.state.kv:
                        if c.length + step > c.capacity:
                            growth += (max(c.length + step, int(c.capacity * GROWTH), 64) - c.capacity) \
                                * layer_token_bytes
            requests = {id(s.request): s.request for s in self.active}
            if self._usage() + growth <= self.max_memory or len(requests) <= 1:
                return
            self._preempt(max(requests.values(), key=lambda r: r.arrival))

    def _preempt(self, req: Request) -> None:
        self.stats["preemptions"] += 1
        for seq in reversed(req.seqs):
            if seq.finished or seq.state is None:
                continue
            self._drop(seq)
            seq.num_computed = 0
            if not seq.token_ids:
                req.prompt_logprobs.clear()
                req.prompt_top_logprobs.clear()
            self.queue.appendleft(seq)  # resumes first, by recompute (+ prefix cache)

    def _drop(self, seq: Sequence) -> None:
        if seq.state is not None:
            self.pool.release(seq.state.slot)
            seq.state = None
        if seq in self.active:
            self.active.remove(seq)
        if seq in self.queue:
            self.queue.remove(seq)

    # -- sampling ---------------------------------------------------------------------------------
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

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], outputs: dict[str, StepOutput]) -> None:
        # padding rows of the embedding are not tokens: never drawn, but logprobs stay the model's own
        result = sample(logits, [s.sampler for s in seqs], vocab_limit=self.valid_vocab)
        toks, lps = result.token_ids.tolist(), result.logprobs.tolist()
        for row, seq in enumerate(seqs):
            tok, lp = toks[row], lps[row]
            top = result.top_logprobs[row] if result.top_logprobs is not None else []
            seq.token_ids.append(tok)
            seq.logprobs.append(lp)
            seq.top_logprobs.append(top)
            seq.sampler.append(tok)
            self.stats["generated_tokens"] += 1
            self.check_stop(seq, tok)
            req = seq.request
            out = outputs.setdefault(req.request_id, StepOutput(req.request_id, []))
            out.updates.append(SeqUpdate(seq.index, [tok], [lp], [top], seq.finish_reason, seq.stop_reason))

    def check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.request.params
        if len(seq.token_ids) >= p.min_tokens:
            if tok in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", tok
            elif not p.ignore_eos and tok in self.eos_token_ids:
                seq.finish_reason = "stop"
        if seq.finish_reason is None:
            if p.max_tokens is not None and len(seq.token_ids) >= p.max_tokens:
                seq.finish_reason = "length"
            elif seq.num_inputs >= seq.request.max_len:
                seq.finish_reason = "length"
        if seq.finished:
            self._drop(seq)


@torch.inference_mode()
def encode_vision(vision: torch.nn.Module, mm: MultiModalInput, max_patches: int = MAX_ENCODE_PATCHES
                  ) -> torch.Tensor:
    """The vision tower over every item of `mm` → embeddings [N_vis, out_hidden], one row per vision token."""
    out = [vision(pv, [grid]) for item in mm.items for pv, grid in item.pixel_chunks(max_patches)]
    emb = torch.cat(out)
    if emb.shape[0] != mm.num_vision_tokens:
        raise ValueError(f"the vision tower gave {emb.shape[0]} embeddings for {mm.num_vision_tokens} vision tokens")
    return emb
