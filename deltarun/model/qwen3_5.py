"""The Qwen3.5 text decoder: embed → layers (by `layer_types`) → norm → lm_head.

Module names mirror the official checkpoint (`model.language_model.*`, `lm_head`), so loading is a
near-identity copy. The model builds its own cache (`new_cache`) and knows nothing of scheduling,
text or HTTP. The vision tower (`model.visual.*`) is model/vision.py and the MTP head (`mtp.*`) model/mtp.py,
each loaded on its own (weights/vision_loader.py, weights/mtp_loader.py).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from ..cache.state import KVCache, ModelCache, SeqState, StatePool
from ..config import ModelConfig, TextConfig
from ..ops import layer as fused
from ..ops.linear import Linear
from .attention import GatedAttention
from .deltanet import GatedDeltaNet
from .layers import MLP, RMSNorm, RotaryEmbedding, embedding, residual_norm


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_type: str, state_index: int):
        super().__init__()
        self.layer_type = layer_type
        self.state_index = state_index  # which DeltaNet pool entry / which KV cache of a sequence
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def fused_parts(self) -> fused.LayerParts:
        """This layer's modules and tensors by what they are to the fused decode ops (ops/layer.py)."""
        norm = lambda m: fused.Norm(m.weight, m.eps)  # noqa: E731
        mlp = self.mlp
        parts = fused.LayerParts(fused.TailParts(norm(self.post_attention_layernorm), mlp.gate_proj, mlp.up_proj,
                                                 mlp.down_proj))
        if self.layer_type == "linear_attention":
            la = self.linear_attn
            parts.gdn = fused.GDNParts(norm(self.input_layernorm), la.in_proj_qkv, la.in_proj_z, la.in_proj_a,
                                       la.in_proj_b, la.out_proj, la.conv1d.weight.view(la.conv_dim, -1), la.A_log,
                                       la.dt_bias, norm(la.norm), la.hk)
        else:
            at = self.self_attn
            parts.attn = fused.AttnParts(norm(self.input_layernorm), at.q_proj, at.k_proj, at.v_proj, at.o_proj,
                                         norm(at.q_norm), norm(at.k_norm), at.nq, at.nkv, at.d, at.scale, at.gated)
        return parts

    def forward(self, x, rope, cache: ModelCache, slots: torch.Tensor):
        plan = fused.plan(self) if fused.usable(x) else None  # decode on the CPU: C++ ops, the same math
        lora = self.__dict__.get("lora_slots")
        if plan is not None and lora is not None and lora.active:  # rows with adapters (ops/lora.py)
            plan = fused.with_adapters(plan, x)
        if plan is not None and plan.gdn is not None and cache.capture is None:
            return fused.gdn_layer(plan, x, cache, self.state_index, slots)
        if plan is not None and plan.attn is not None:
            y = fused.attn_layer(plan, x, rope, [s.kv[self.state_index] for s in cache.seqs])
            if y is not None:
                return y
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, cache.pool, self.state_index, slots, cache.capture, cache.spans)
        else:
            h = self.self_attn(h, rope, [s.kv[self.state_index] for s in cache.seqs], cache.spans)
        if plan is not None:
            return fused.tail(plan, x, h)
        x, h = residual_norm(x, h, self.post_attention_layernorm)
        return x + self.mlp(h)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        kinds = cfg.layer_types
        self.layers = nn.ModuleList(DecoderLayer(cfg, lt, kinds[:i].count(lt)) for i, lt in enumerate(kinds))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rope, cfg.rotary_dim)


class Qwen3_5Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.language_model = TextModel(cfg)


class Qwen3_5ForCausalLM(nn.Module):
    from_gguf: bool = False  # loaded from a GGUF file (weights/gguf.py reorders DeltaNet heads: no LoRA on it)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        cfg = config.text
        self.model = Qwen3_5Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.norm.weight.dtype  # lm_head may be quantized

    @property
    def device(self) -> torch.device:
        return self.model.language_model.norm.weight.device

    def state_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        layers = cast(Iterable[DecoderLayer], self.model.language_model.layers)
        return [layer.linear_attn.state_shapes() for layer in layers if layer.layer_type == "linear_attention"]

    @property
    def num_kv_layers(self) -> int:
        return self.config.text.layer_types.count("full_attention")

    def new_pool(self, num_slots: int) -> StatePool:
        return StatePool(self.state_shapes(), num_slots, self.dtype, self.device)

    def new_cache(self, batch: int = 1) -> ModelCache:
        """A standalone cache for `batch` fresh sequences (tests, benchmarks; the engine pools its own)."""
        pool = self.new_pool(batch)
        return ModelCache(pool, [SeqState(pool.alloc(), [KVCache() for _ in range(self.num_kv_layers)])
                                 for _ in range(batch)])

    def forward(
        self,
        input_ids: torch.Tensor | None,
        cache: ModelCache,
        positions: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (or inputs_embeds [B, T, H]) → final-normed hidden states [B, T, H].

        Row b continues sequence cache.seqs[b]; packed (`cache.seq_lens`, B = 1), the row's consecutive
        segments continue the sequences in turn. positions [3, B, T] are M-RoPE (temporal, height, width)
        indices; for text they default to each sequence's length + 0 … T-1 on all three axes.
        Advances every sequence by its T tokens.
        """
        lm = self.model.language_model
        x = lm.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        lens = cache.seq_lens or [t] * len(cache.seqs)
        if cache.seq_lens is not None and (b != 1 or sum(lens) != t or len(lens) != len(cache.seqs)):
            raise ValueError(f"a packed forward takes one row of sum(seq_lens) = {sum(lens)} inputs for "
                             f"{len(cache.seqs)} sequences, not {b} × {t}")
        if positions is None:
            if cache.seq_lens is None:
                start = torch.tensor([s.length for s in cache.seqs], device=x.device)
                pos = start[:, None] + torch.arange(t, device=x.device)
            else:
                pos = torch.cat([torch.arange(s.length, s.length + n, device=x.device)
                                 for s, n in zip(cache.seqs, lens)])[None]
            positions = pos.unsqueeze(0).expand(3, b, t)
        rope = lm.rotary_emb(positions, x.dtype)
        slots = cache.slots(x.device)
        for layer in lm.layers:
            x = layer(x, rope, cache, slots)
        for s, n in zip(cache.seqs, lens):
            s.length += n
        return lm.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] → logits [..., V] in fp32."""
        return self.lm_head(hidden).float()
