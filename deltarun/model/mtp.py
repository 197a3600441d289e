"""The multi-token-prediction (MTP) head of Qwen3.5 (`mtp.*` tensors): a one-layer draft model.

Wiring (checked against vLLM `model_executor/models/qwen3_5_mtp.py`, `Qwen3_5MultiTokenPredictor`):
    x = fc(concat[pre_fc_norm_embedding(embed(token_{t+1})), pre_fc_norm_hidden(h_t)])   # 2H → H
    x = layers.0(x)            (a full-attention decoder layer with its own KV cache)
    out = norm(x);  logits = lm_head(out)  → predicts token_{t+2}
`h_t` is the target model's final-normed hidden state at position t (what its forward returns), the
MTP layer runs at position t (vLLM's proposer passes the target positions with the ids shifted left by
one), and later draft steps feed the head's own normed output back as `h`. The embedding, rotary
tables and lm_head are the main model's (`mtp_use_dedicated_embeddings: false`), passed in per call.
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..cache.state import KVCache
from ..config import TextConfig
from ..ops.linear import Linear
from .layers import RMSNorm
from .qwen3_5 import DecoderLayer, Qwen3_5ForCausalLM


class MTPHead(nn.Module):
    """Attribute names are the checkpoint's with the `mtp.` prefix removed."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        h = cfg.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(h, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(h, cfg.rms_norm_eps)
        self.fc = Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, "full_attention", 0)
                                    for _ in range(max(1, cfg.mtp_num_hidden_layers)))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, model: Qwen3_5ForCausalLM, next_ids: torch.Tensor, hidden: torch.Tensor,
                positions: torch.Tensor, caches: list[KVCache], step: int = 0) -> torch.Tensor:
        """next_ids [B, T] (token t+1), hidden [B, T, H] (h_t), positions [B, T] (= t) → normed output
        [B, T, H]; row b appends its T keys/values to caches[b]. `step` picks the layer when there are
        several (as vLLM: step % num_layers); the Qwen3.5 Small checkpoints have one."""
        lm = model.model.language_model
        e = self.pre_fc_norm_embedding(lm.embed_tokens(next_ids))
        x = self.fc(torch.cat([e, self.pre_fc_norm_hidden(hidden.to(e.dtype))], dim=-1))
        rope = lm.rotary_emb(positions.unsqueeze(0).expand(3, -1, -1), x.dtype)
        layer = cast(DecoderLayer, self.layers[step % len(self.layers)])
        # DecoderLayer.forward reads KV through a ModelCache of pooled sequences; the head owns one
        # standalone KVCache per sequence, so the (pre-norm, residual) layer body is spelled out here.
        x = x + layer.self_attn(layer.input_layernorm(x), rope, caches)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)
