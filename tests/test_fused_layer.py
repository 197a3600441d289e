"""The fused decode layers (ops/layer.py, csrc/layer.cpp) against the modules they replace: the same
kernels in the same order, so logits and pooled states must be bit for bit equal, for bf16, int8 and int4
weights, one or several sequences, consecutive or scattered pool slots; and the fused path runs on every
CPU level for a model whose widths every kernel layout takes."""
from __future__ import annotations

import pytest
import torch
from tiny import make_checkpoint, tiny_config

from deltarun.cache.state import KVCache, ModelCache, SeqState
from deltarun.ops import gemv
from deltarun.ops import layer as fused
from deltarun.ops.linear import Linear
from deltarun.ops.quant import QuantLinear
from deltarun.ops.settings import reload as reload_settings
from deltarun.weights.loader import load_model

pytestmark = pytest.mark.usefixtures("cpu_kernels")


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


def _on_kernel(mod) -> bool:
    """Whether a decode-sized call of `mod` runs on one of our kernels (what a fused layer can call)."""
    if isinstance(mod, Linear):
        if mod.routes is not None and mod.routes["decode"] == "gemv_bf16":
            return True
        return mod.weight.dtype == torch.float32  # DeltaNet's fp32 in_proj_a / in_proj_b
    k = getattr(mod, "_kernel", None)
    return isinstance(mod, QuantLinear) and k is not None and k.op in (gemv.int8_mm, gemv.int4_mm)


@pytest.fixture(scope="module")
def aligned_ckpt(tmp_path_factory):
    """Every layer width a multiple of 64, so every int4 row-block layout (32 rows on AVX2, 64 on AVX-512)
    packs every linear for our kernel: the fused path must run for each layer on every CPU."""
    return make_checkpoint(tmp_path_factory.mktemp("aligned") / "m",
                           tiny_config(intermediate_size=128, linear_value_head_dim=32), seed=3)


@pytest.mark.parametrize("quantization", [None, "int8", "int4:32"])
@pytest.mark.parametrize("slots", [[0], [0, 1, 2], [3, 0, 2], [8, 0, 2, 5, 1, 7, 3, 6, 4]])
@pytest.mark.parametrize("ckpt", ["aligned", "hybrid"])
def test_fused_decode_is_bit_exact(request, monkeypatch, quantization, slots, ckpt):
    path = request.getfixturevalue("aligned_ckpt" if ckpt == "aligned" else "tiny_ckpt")
    model = load_model(path, dtype="bfloat16", device="cpu", quantization=quantization)
    layers = model.model.language_model.layers
    # 62 prompt tokens: the KV caches (64 tokens at first) grow during the fused steps
    prompt = torch.randint(0, 1000, (len(slots), 62), generator=torch.Generator().manual_seed(1))
    got, got_states = _decode(model, slots, prompt, steps=5)
    plans = [fused.plan(layer) for layer in layers]
    for p, layer in zip(plans, layers):
        # a layer is fused exactly where every linear it calls runs on our kernels: all of them in the aligned
        # model; in the hybrid one (widths 96 and 160) not the int4 weights where torch's CPU int4 layout packs
        # rows by 64 (AVX-512), whose layers then run the modules, compared below all the same
        mlp = (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        mixer = layer.linear_attn if layer.layer_type == "linear_attention" else layer.self_attn
        own = [m for m in mixer.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
        assert (p is not None) == all(map(_on_kernel, mlp))
        assert p is None or (p.gdn is not None or p.attn is not None) == all(map(_on_kernel, own))
        assert p is None or p.gdn is None or layer.layer_type == "linear_attention"
        assert p is None or p.attn is None or layer.layer_type == "full_attention"
    if ckpt == "aligned":  # the fused path really ran, whole layers, on every CPU level
        assert all(p is not None and (p.gdn is not None or p.attn is not None) for p in plans)
        if quantization:  # … and it read the quantized kernels' tensors
            kinds = {a[0].dtype for p in plans for a in p.tail[2:]}
            assert kinds == {torch.int8 if quantization == "int8" else torch.uint8}

    monkeypatch.setenv("DELTARUN_FUSED_LAYERS", "0")
    reload_settings()
    fused.reset(model)
    assert fused.plan(layers[0]) is None
    want, want_states = _decode(model, slots, prompt, steps=5)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for g, w in zip(got_states, want_states):
        assert torch.equal(g, w)


@pytest.mark.parametrize("quantization", [None, "int8", "int4:32"])
def test_fused_decode_with_adapters_is_bit_exact(aligned_ckpt, monkeypatch, quantization):
    """Rows on two LoRA adapters and one row on none, through the fused layers (ops/layer.py `with_adapters`):
    bit for bit the modules with their delta hooks (ops/lora.py); the fused ops really ran, and the deltas
    really joined them (the adapter rows differ from the base, the row without stays the base's)."""
    from deltarun.ops.lora import NONE, slots_of
    from deltarun.weights.lora import _linears

    model = load_model(aligned_ckpt, dtype="bfloat16", device="cpu", quantization=quantization)
    lora = slots_of(model, 2, 4)
    g = torch.Generator().manual_seed(7)
    for name, mod in _linears(model).items():
        for s in (0, 1):
            lora.hook(model, name).set(s, torch.randn(4, mod.in_features, generator=g) * 0.2,
                                       torch.randn(mod.out_features, 4, generator=g) * 0.2, 0.5)
    calls: list[int] = []
    for op in ("gdn_layer", "attn_layer"):
        real = getattr(fused, op)
        monkeypatch.setattr(fused, op, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    slots, rows = [3, 0, 2], [0, NONE, 1]
    prompt = torch.randint(0, 1000, (3, 30), generator=torch.Generator().manual_seed(2))
    with lora.use(rows):
        got, got_states = _decode(model, slots, prompt, steps=4)
    assert len(calls) == 4 * len(model.model.language_model.layers)  # every decode step, every layer fused
    with lora.use([NONE] * 3):
        base, _ = _decode(model, slots, prompt, steps=4)
    assert torch.equal(got[0][1], base[0][1]) and not torch.equal(got[0][0], base[0][0])
    assert not torch.equal(got[0][2], base[0][2])

    monkeypatch.setenv("DELTARUN_FUSED_LAYERS", "0")
    reload_settings()
    fused.reset(model)
    with lora.use(rows):
        want, want_states = _decode(model, slots, prompt, steps=4)
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)
    for g_, w in zip(got_states, want_states):
        assert torch.equal(g_, w)
