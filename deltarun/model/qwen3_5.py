"""The Qwen3.5 text decoder: embed → layers (by `layer_types`) → norm → lm_head.

Module names mirror the official checkpoint (`model.language_model.*`, `lm_head`), so loading is a
near-identity copy. The model builds its own cache (`new_cache`) and knows nothing of scheduling,
text or HTTP. Vision (`model.visual.*`) and MTP (`mtp.*`) weights are not built here yet.
"""
from __future__ import annotations

import torch
from torch import nn

from ..cache.state import KVCache, ModelCache
from ..config import ModelConfig, TextConfig
from .attention import GatedAttention
from .deltanet import GatedDeltaNet
from .layers import MLP, RMSNorm, RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, state):
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, state)
        else:
            h = self.self_attn(h, rope, state)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, lt) for lt in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rope, cfg.rotary_dim)


class Qwen3_5Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.language_model = TextModel(cfg)


class Qwen3_5ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        cfg = config.text
        self.model = Qwen3_5Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, batch: int = 1) -> ModelCache:
        layers = []
        for layer in self.model.language_model.layers:
            if layer.layer_type == "linear_attention":
                layers.append(layer.linear_attn.new_state(batch, self.dtype, self.device))
            else:
                layers.append(KVCache())
        return ModelCache(layers=layers)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        cache: ModelCache,
        positions: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (or inputs_embeds [B, T, H]) → final-normed hidden states [B, T, H].

        positions [3, B, T] are M-RoPE (temporal, height, width) indices; for text they default to
        cache.length … cache.length + T - 1 on all three axes. Advances `cache` by T tokens.
        """
        lm = self.model.language_model
        x = lm.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if positions is None:
            pos = torch.arange(cache.length, cache.length + t, device=x.device)
            positions = pos.view(1, 1, t).expand(3, b, t)
        rope = lm.rotary_emb(positions, x.dtype)
        for layer, state in zip(lm.layers, cache.layers):
            x = layer(x, rope, state)
        cache.length += t
        return lm.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] → logits [..., V] in fp32."""
        return self.lm_head(hidden).float()
