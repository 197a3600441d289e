"""Per-sequence model state: a growable KV cache for full-attention layers, fixed-size state for DeltaNet.

Layout (one `ModelCache` per running batch of sequences that advance together):
  * full-attention layer → `KVCache`: k, v [B, Hkv, capacity, D] in the model dtype; capacity grows
    geometrically with the tokens held, so memory follows use.
  * linear-attention layer → `DeltaNetState`: conv [B, conv_dim, K-1] (model dtype) and
    recurrent [B, Hv, Dk, Dv] in fp32 whatever the weight dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [B, Hkv, T, D]; return views of all cached keys and values [B, Hkv, length, D]."""
        t = k.shape[2]
        need = self.length + t
        if self.k is None or need > self.k.shape[2]:
            cap = max(need, 256, 2 * (self.k.shape[2] if self.k is not None else 0))
            nk = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            nv = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if self.length:
                nk[:, :, : self.length] = self.k[:, :, : self.length]
                nv[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = nk, nv
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


@dataclass
class DeltaNetState:
    conv: torch.Tensor  # [B, conv_dim, K-1]
    recurrent: torch.Tensor  # [B, Hv, Dk, Dv] fp32

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.recurrent))


@dataclass
class ModelCache:
    layers: list[KVCache | DeltaNetState]
    length: int = 0  # tokens already processed (the next token's position)
    extra: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def clone_cache(cache: ModelCache) -> ModelCache:
    """An independent copy (used to fork n samples from one prefilled prompt)."""
    layers: list[KVCache | DeltaNetState] = []
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            k = None if layer.k is None else layer.k[:, :, : layer.length].clone()
            v = None if layer.v is None else layer.v[:, :, : layer.length].clone()
            layers.append(KVCache(k, v, layer.length))
        else:
            layers.append(DeltaNetState(layer.conv.clone(), layer.recurrent.clone()))
    return ModelCache(layers=layers, length=cache.length)
