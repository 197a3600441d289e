"""The tensor side of a step: scheduled sequences → input tensors → model → logits → sampled tokens.

`ModelRunner` owns the model, the DeltaNet state pool, the prefix cache and the decode strategy (plain, or
MTP speculation: speculative.py, which returns the tokens it accepted through `sample`-like updates).
It makes a newly admitted sequence's state (restoring the deepest cached prefix), runs prefill chunks
(embedding images/videos: the vision tower runs once per request, lazily, when the first chunk holding
vision tokens is prefilled; each chunk scatters in its own vision rows with the prompt's M-RoPE
positions), snapshots states at block boundaries for the prefix cache, computes prompt log-probs,
forks states for n > 1, and samples. Stops and freeing are the scheduler's (scheduler.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..cache.prefix import PrefixCache
from ..cache.state import KVCache, ModelCache, SeqState, StatePool
from ..inputs import MAX_ENCODE_PATCHES, MultiModalInput, SeqUpdate, StepOutput
from ..model.qwen3_5 import Qwen3_5ForCausalLM
from ..ops.sampling import SamplerState, prompt_logprobs, sample
from ..sampling import SamplingParams
from .sequence import Request, Sequence

if TYPE_CHECKING:
    from .adapters import AdapterSet
    from .scheduler import Chunk
    from .speculative import Speculator

LOGITS_CHUNK = 256  # prompt positions per logits block: bounds the [T, vocab] fp32 buffer


class ModelRunner:
    def __init__(self, model: Qwen3_5ForCausalLM, pool: StatePool, prefix: PrefixCache, *, eos_token_ids: list[int],
                 valid_vocab: int, kv_int8: bool, vision: torch.nn.Module | None, stats: dict,
                 check_stop: Callable[[Sequence, int], None]):
        self.model, self.pool, self.prefix, self.stats = model, pool, prefix, stats
        self.eos_token_ids, self.valid_vocab, self.kv_int8 = list(eos_token_ids), valid_vocab, kv_int8
        self.vision = vision  # the vision tower (may be set later: front ends load it on first use)
        self.check_stop = check_stop  # the scheduler's: marks a sequence finished after a token
        self.spec: Speculator | None = None  # the MTP speculator, set by the engine; None: plain decoding
        self.adapters: AdapterSet | None = None  # the LoRA adapters requests may name, set by the engine

    # -- states -----------------------------------------------------------------------------------
    def new_state(self, capacity: int) -> SeqState:
        t = self.model.config.text
        kv = []
        for _ in range(self.model.num_kv_layers):
            c = KVCache(quantized=self.kv_int8)
            like = torch.empty(1, t.num_key_value_heads, 0, t.head_dim, dtype=self.model.dtype,
                               device=self.model.device)
            c.reserve(capacity, like)
            kv.append(c)
        return SeqState(self.pool.alloc(), kv)

    def start(self, seq: Sequence) -> None:
        """Give an admitted sequence its state, resumed from the deepest cached prefix of its inputs."""
        seq.state = self.new_state(seq.prefill_target + 1)
        fresh = not seq.token_ids
        if fresh and seq.request.params.prompt_logprobs is not None:
            return  # a hit would skip the prefix's logits
        # a fresh prompt must compute ≥ 1 token: its last position's logits give the first sample
        hit = self.prefix.lookup(seq.key_inputs, seq.prefill_target - (1 if fresh else 0), seq.key_salt)
        if hit is not None:
            self.pool.restore(seq.state.slot, hit.snapshot)
            for dst, src in zip(seq.state.kv, hit.kv):
                dst.copy_prefix(src, hit.length)
            seq.num_computed = seq.state.length = hit.length
            if fresh:
                seq.request.cached_tokens = hit.length

    def fork(self, parent: Sequence, index: int) -> Sequence:
        """Completion `index` of the parent's request, from a copy of the parent's state after its prompt."""
        req = parent.request
        child = Sequence(index, req, self.sampler(req, index), num_computed=parent.num_computed)
        child.state = self.new_state(parent.prefill_target + 1)
        self.pool.copy_slot(parent.held_state.slot, child.state.slot)
        for dst, src in zip(child.state.kv, parent.held_state.kv):
            dst.copy_prefix(src, src.length)
        child.state.length = parent.held_state.length
        if self.spec is not None:
            self.spec.fork(parent, child)
        return child

    # -- forwards ---------------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence], outputs: dict[str, StepOutput]) -> None:
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
        hidden = self.run_model(seqs, ids, ModelCache(self.pool, [s.held_state for s in seqs]), positions=positions)
        for s in seqs:
            s.num_computed += 1
        self.sample(self.model.logits(hidden[:, -1]), seqs, outputs)

    def prefill(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """Compute each chunk's inputs start … end−1 into its sequence's state, all in one forward (packed:
        their matmuls share one pass over the weights); returns their hidden states, [T_i, H] each.
        Chunks of several sequences must be text only, with one adapter (the scheduler batches them so)."""
        if len(chunks) == 1:
            c = chunks[0]
            return [self._prefill_one(c.seq, c.start, c.end, c.target)]
        seqs = [c.seq for c in chunks]
        ids = torch.tensor([[t for c in chunks for t in c.seq.inputs[c.start:c.end]]], device=self.model.device)
        lens = [c.end - c.start for c in chunks]
        hidden = self.run_model(seqs, ids, ModelCache(self.pool, [s.held_state for s in seqs], seq_lens=lens))[0]
        parts = list(hidden.split(lens))
        for c, h in zip(chunks, parts):
            self._prefilled(c.seq, h, c.start, c.end, c.target)
        return parts

    def _prefill_one(self, seq: Sequence, start: int, end: int, target: int) -> torch.Tensor:
        req = seq.request
        ids = torch.tensor([seq.inputs[start:end]], device=self.model.device)
        cache = ModelCache(self.pool, [seq.held_state])
        if req.mm is None:
            hidden = self.run_model([seq], ids, cache)[0]
        else:
            positions = req.mm.positions_for(start, end)[:, None].to(self.model.device)
            hidden = self.run_model([seq], None, cache, positions=positions,
                                    inputs_embeds=self._embed(req, ids, start, end))[0]
        self._prefilled(seq, hidden, start, end, target)
        return hidden

    def _prefilled(self, seq: Sequence, hidden: torch.Tensor, start: int, end: int, target: int) -> None:
        """After a chunk's forward: its counters, the MTP context, a prefix snapshot, prompt log-probs."""
        req = seq.request
        seq.num_computed = end
        self.stats["prompt_tokens"] += end - start
        if self.spec is not None:
            self.spec.on_prefill(seq, hidden, start)  # the MTP head's context
        blk = self.prefix.block
        if end % blk == 0 and self.prefix.budget > 0:
            self.prefix.insert(seq.key_inputs, end, self.pool.snapshot(seq.held_state.slot), seq.held_state.kv,
                               seq.key_salt)
        mm = req.mm  # a request has vision embeddings only when it has images/videos
        if req.vision_embeds is not None and mm is not None and all(s.num_computed >= mm.num_prompt for s in req.seqs
                                                                    if not s.finished):
            req.vision_embeds = None  # every vision token is in the state now
        if not seq.token_ids and req.params.prompt_logprobs is not None:
            self._prompt_logprobs(req, hidden, start, end == target)

    def run_model(self, seqs: list[Sequence], ids: torch.Tensor | None, cache: ModelCache, **kw) -> torch.Tensor:
        """The model over `seqs` (row i of ids is seqs[i]'s), each row with its request's adapter."""
        self.stats["forwards"] += 1
        names = [s.request.adapter for s in seqs]
        if cache.seq_lens is not None:  # packed: one row, and its sequences share one adapter (scheduler.py)
            assert len(set(names)) == 1
            names = names[:1]
        slots = self.model.__dict__.get("lora_slots")
        if self.adapters is None or (slots is None and all(n is None for n in names)):
            return self.model(ids, cache, **kw)
        seq_slots = self.adapters.slots(names)  # may (re)build the model's slots
        with self.model.__dict__["lora_slots"].use(seq_slots):
            return self.model(ids, cache, **kw)

    def _embed(self, req: Request, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Embeddings [1, T, H] of inputs start … end−1 with the vision rows of the tokens among them."""
        x = self.model.model.language_model.embed_tokens(ids)
        mm = req.mm
        assert mm is not None  # only requests with images/videos are embedded here
        a, b = mm.rows(start, end)
        if a < b:
            if req.vision_embeds is None:  # once per request, and only if a chunk needs it (not on a hit)
                assert self.vision is not None  # check_request refuses images/videos without a vision tower
                req.vision_embeds = encode_vision(self.vision, mm)
                self.stats["vision_encodes"] += 1
            idx = (mm.vision_index[a:b] - start).to(x.device)
            x[0, idx] = req.vision_embeds[a:b].to(device=x.device, dtype=x.dtype)
        return x

    # -- sampling ---------------------------------------------------------------------------------
    def _prompt_logprobs(self, req: Request, hidden: torch.Tensor, start: int, done: bool) -> None:
        if start == 0:
            req.prompt_logprobs.append(None)  # nothing predicts the first token
            req.prompt_top_logprobs.append(None)
        n = hidden.shape[0] - (1 if done else 0)  # the prompt's last position predicts no prompt token
        k = req.params.prompt_logprobs
        assert k is not None  # called only for requests that asked for prompt log-probs
        for a in range(0, n, LOGITS_CHUNK):
            b = min(n, a + LOGITS_CHUNK)
            nxt = torch.tensor(req.prompt_ids[start + a + 1 : start + b + 1], device=hidden.device)
            lp, top = prompt_logprobs(self.model.logits(hidden[a:b]), nxt, k)
            req.prompt_logprobs.extend(lp.tolist())
            req.prompt_top_logprobs.extend(top if k else [[] for _ in range(b - a)])

    def sampler(self, req: Request, index: int) -> SamplerState:
        params = req.params
        if params.seed is not None and index:
            # n samples from one seed must differ from each other yet stay reproducible
            params = SamplingParams(**{**params.__dict__, "seed": params.seed + index})
        return SamplerState(params, req.prompt_ids, self.model.config.text.vocab_size, self.model.device,
                            eos_token_ids=self.eos_token_ids)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], outputs: dict[str, StepOutput]) -> None:
        """One token per row of logits [B, V] for seqs[B]: appended, stop-checked and reported."""
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


@torch.inference_mode()
def encode_vision(vision: torch.nn.Module, mm: MultiModalInput, max_patches: int = MAX_ENCODE_PATCHES
                  ) -> torch.Tensor:
    """The vision tower over every item of `mm` → embeddings [N_vis, out_hidden], one row per vision token."""
    out = [vision(pv, [grid]) for item in mm.items for pv, grid in item.pixel_chunks(max_patches)]
    emb = torch.cat(out)
    if emb.shape[0] != mm.num_vision_tokens:
        raise ValueError(f"the vision tower gave {emb.shape[0]} embeddings for {mm.num_vision_tokens} vision tokens")
    return emb
