"""The fused decode layers (ops/layer.py, csrc/layer.cpp) against the modules they replace: the same
kernels in the same order, so logits and pooled states must be bit for bit equal, for bf16, int8 and int4
weights, one or several sequences, consecutive or scattered pool slots."""
from __future__ import annotations

import pytest
import torch

from deltarun.cache.state import KVCache, ModelCache, SeqState
from deltarun.ops import gemv
from deltarun.ops import layer as fused
from deltarun.weights.loader import load_model

pytestmark = pytest.mark.skipif(not gemv.available(), reason="CPU kernels not built here")


def _decode(model, slots: list[int], prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list]:
    pool = model.new_pool(max(slots) + 1)
    seqs = [SeqState(s, [KVCache() for _ in range(model.num_kv_layers)]) for s in slots]
    cache = ModelCache(pool, seqs)
    with torch.inference_mode():
        hidden = model(prompt, cache)  # prefill: the modules
        ids = model.logits(hidden[:, -1]).argmax(-1, keepdim=True)
        out = []
        for _ in range(steps):
            logits = model.logits(model(ids, cache)[:, -1])
            out.append(logits)
            ids = logits.argmax(-1, keepdim=True)
    return out, [t[slots].clone() for t in (*pool.conv, *pool.recurrent)]


@pytest.mark.parametrize("quantization", [None, "int8", "int4:32"])
@pytest.mark.parametrize("slots", [[0], [0, 1, 2], [3, 0, 2]])
def test_fused_decode_is_bit_exact(tiny_ckpt, monkeypatch, quantization, slots):
    model = load_model(tiny_ckpt, dtype="bfloat16", device="cpu", quantization=quantization)
    layers = model.model.language_model.layers
    # 62 prompt tokens: the KV caches (64 tokens at first) grow during the fused steps
    prompt = torch.randint(0, 1000, (len(slots), 62), generator=torch.Generator().manual_seed(1))
    got, got_states = _decode(model, slots, prompt, steps=5)
    plans = [fused.plan(layer) for layer in layers]
    assert all(p is not None for p in plans)  # the fused path really ran: every layer has a plan …
    assert all((p.gdn is not None) == (layer.layer_type == "linear_attention") for p, layer in zip(plans, layers))
    assert all((p.attn is not None) == (layer.layer_type == "full_attention") for p, layer in zip(plans, layers))
    if quantization:  # … and it read the quantized kernels' tensors
        kinds = {a[0].dtype for p in plans for a in p.tail[2:]}
        assert kinds == {torch.int8 if quantization == "int8" else torch.uint8}

    monkeypatch.setenv("DELTARUN_FUSED_LAYERS", "0")
    fused.reset(model)
    assert fused.plan(layers[0]) is None
    want, want_states = _decode(model, slots, prompt, steps=5)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for g, w in zip(got_states, want_states):
        assert torch.equal(g, w)
