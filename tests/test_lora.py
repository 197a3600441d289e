"""PEFT LoRA adapters (weights/lora.py) against the reference: transformers + peft, same random weights, fp32.

Adapters are made by peft itself (LoraConfig + get_peft_model + save_pretrained) with random A and B (peft
zero-inits B, which would hide every mistake). Each case: prompt log-probs within 1e-4 and 32 identical greedy
tokens, on every target family (attention, MLP, DeltaNet), both training classes' names (multimodal
`model.language_model.layers.*`, text-only `model.layers.*`), rslora, rank/alpha patterns, regex and all-linear
target_modules, layers_to_transform / exclude_modules; LLM and AsyncLLM; the merged checkpoint against the same
reference; a bf16 decode (the fused-layer path) with the adapter; an int8 base; and every refusal with its message.
"""
from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import N_GEN, N_PROMPT, _ids, _ref_greedy, _ref_logprobs, make_adapter  # noqa: F401
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5ForCausalLM as HFCausalLM
from transformers import Qwen3_5TextConfig

from deltarun import LLM, SamplingParams
from deltarun.weights.lora import merge, read_adapter
from deltarun.weights.lora_config import LoRAError

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
GDN = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]


@pytest.fixture(scope="module")
def text_only_ckpt(tmp_path_factory):
    """A checkpoint saved by transformers' text-only Qwen3_5ForCausalLM (`model.layers.*`), random weights."""
    cfg = Qwen3_5TextConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention", "linear_attention"], num_hidden_layers=3,
        vocab_size=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    torch.manual_seed(0)
    ref = HFCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 2:  # transformers' 0.02 init makes near-ties that any rounding flips
                p.normal_(0, p.shape[1] ** -0.5)
    out = tmp_path_factory.mktemp("lora") / "text_only"
    ref.save_pretrained(out)
    return out


def _ours(llm, ids, n=N_GEN):
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=n, prompt_logprobs=0, ignore_eos=True))[0]
    lp = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])])
    return lp, out.outputs[0].token_ids


def check_exact(ref, folder, ids, **llm_kw):
    """deltarun on `folder` (+ llm_kw) against the PEFT reference: returns the max |Δ log-prob|."""
    lp, tokens = _ours(LLM(str(folder), dtype="float32", device="cpu", **llm_kw), ids)
    diff = (lp - _ref_logprobs(ref, ids)).abs().max().item()
    assert diff <= 1e-4, f"max |Δ logprob| {diff}"
    assert tokens == _ref_greedy(ref, ids)
    with ref.disable_adapter():  # the adapter really changes the model: the test is not vacuous
        assert (lp - _ref_logprobs(ref, ids)).abs().max() > 1e-2
    return diff


CASES = {  # name: (text-only class?, LoraConfig fields)
    "attention": (False, dict(r=4, lora_alpha=8, target_modules=ATTN)),
    "mlp_rslora": (True, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=MLP)),
    "deltanet_patterns": (False, dict(r=4, lora_alpha=4, target_modules=GDN,
                                      rank_pattern={"in_proj_qkv": 6, "layers.2.linear_attn.out_proj": 2},
                                      alpha_pattern={"in_proj_z": 12.0, "layers.0.linear_attn.in_proj_a": 1.0})),
    "regex": (False, dict(r=4, lora_alpha=8,
                          target_modules=r".*language_model.*\.(q_proj|o_proj|down_proj|in_proj_qkv|in_proj_b)")),
    "all_linear_text_only": (True, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "layers_exclude": (False, dict(r=4, lora_alpha=8, target_modules=ATTN + MLP, layers_to_transform=[1, 2, 4],
                                   layers_pattern="layers",
                                   exclude_modules=["model.language_model.layers.4.mlp.up_proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_matches_peft(case, tiny_ckpt, text_only_ckpt, tmp_path):
    text_only, lora = CASES[case]
    base = text_only_ckpt if text_only else tiny_ckpt
    ref, folder = make_adapter(base, text_only, tmp_path / "adapter", seed=len(case), **lora)
    keys = load_file(str(folder / "adapter_model.safetensors"))
    if case == "layers_exclude":  # peft's own selection, which deltarun's reading of the config must agree with
        assert not any(".layers.0." in k or ".layers.3." in k or "layers.4.mlp.up_proj" in k for k in keys)
    assert all(k.startswith("base_model.model.model.layers." if text_only
                            else "base_model.model.model.language_model.layers.") for k in keys)
    diff = check_exact(ref, base, _ids(512), lora=folder)
    print(f"{case}: max |Δ logprob| {diff:.2e}")


@pytest.mark.slow
@pytest.mark.long
def test_real_0_8b_shape_adapter(real_08b_ckpt, tmp_path):
    """The full Qwen3.5-0.8B shape (random weights) with a peft adapter on every projection family (rank 16):
    prompt log-probs within 1e-4 of transformers + peft in fp32 and 64 identical greedy tokens."""
    ref, folder = make_adapter(real_08b_ckpt, False, tmp_path / "adapter", seed=8, r=16, lora_alpha=32,
                               target_modules=ATTN + MLP + GDN)
    ids = _ids(248_000, seed=9)
    lp, tokens = _ours(LLM(str(real_08b_ckpt), dtype="float32", device="cpu", lora=str(folder)), ids, n=64)
    assert (lp - _ref_logprobs(ref, ids)).abs().max() <= 1e-4
    assert tokens == _ref_greedy(ref, ids, n=64)
    with ref.disable_adapter():
        assert (lp - _ref_logprobs(ref, ids)).abs().max() > 1e-2


def test_merge_equals_adapter(tiny_ckpt, tmp_path):
    from deltarun.cli.main import main

    ref, folder = make_adapter(tiny_ckpt, False, tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                               target_modules=ATTN + MLP + GDN)
    ids = _ids(1024, seed=2)
    merged = merge(tiny_ckpt, folder, tmp_path / "merged")
    check_exact(ref, merged, ids)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert main(["merge", str(tiny_ckpt), str(folder), str(tmp_path / "cli")]) == 0  # the CLI: the same folder
    cli, api = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "cli", merged))
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)


def test_merge_text_only_checkpoint(text_only_ckpt, tmp_path):
    """A flat checkpoint (`model.layers.*`, transformers' text-only class) merged with its class's adapter."""
    ref, folder = make_adapter(text_only_ckpt, True, tmp_path / "adapter", seed=6, r=4, lora_alpha=8,
                               target_modules="all-linear")
    check_exact(ref, merge(text_only_ckpt, folder, tmp_path / "merged"), _ids(512, seed=8))


def test_bf16_decode_takes_the_adapter(tiny_ckpt, tmp_path, cpu_kernels, monkeypatch):
    """bf16 decode runs the fused C++ layers, with the adapter's deltas inside them (ops/layer.py
    `with_adapters`). Scored against the fp32 reference: the generated tokens' log-probs follow the adapter,
    not the base."""
    from deltarun import LoRARequest
    from deltarun.ops import layer as fused

    ref, folder = make_adapter(tiny_ckpt, False, tmp_path / "adapter", seed=4, r=8, lora_alpha=32,
                               target_modules=MLP + GDN)
    llm = LLM(str(tiny_ckpt), dtype="bfloat16", device="cpu")
    calls = []
    real = fused.gdn_layer
    monkeypatch.setattr(fused, "gdn_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = _ids(1024, seed=5)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=0, ignore_eos=True)
    out = llm.generate(ids, params, lora_request=LoRARequest("a", 1, str(folder)))[0].outputs[0]
    assert len(calls) >= 15  # the decode steps (after the first token) ran the fused layers
    ours = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])
    full = ids + out.token_ids
    want = _ref_logprobs(ref, full)[len(ids) - 1:]
    with ref.disable_adapter():
        base = _ref_logprobs(ref, full)[len(ids) - 1:]
    assert (ours - want).abs().max() < 0.1 < (ours - base).abs().max()


# ------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def good_peft(tiny_ckpt, tmp_path_factory):
    return make_adapter(tiny_ckpt, False, tmp_path_factory.mktemp("lora") / "good", r=4, lora_alpha=8,
                        target_modules=ATTN + GDN)


@pytest.fixture(scope="module")
def good_adapter(good_peft):
    return good_peft[1]


@pytest.fixture(scope="module")
def meta_model(tiny_ckpt):
    from deltarun.config import ModelConfig
    from deltarun.model.qwen3_5 import Qwen3_5ForCausalLM

    with torch.device("meta"):
        return Qwen3_5ForCausalLM(ModelConfig.from_file(tiny_ckpt / "config.json"))


def _edited(src, dst, config=None, tensors=None):
    """A copy of adapter folder `src` with config fields replaced and tensors edited (`tensors(dict)`)."""
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(str(src / "adapter_model.safetensors"))
    save_file(tensors(t) if tensors else t, str(dst / "adapter_model.safetensors"))
    return dst


def _rename(old: str, new: str):
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


def _reshape(t):
    k = next(k for k in t if k.endswith("q_proj.lora_A.weight"))
    return {**t, k: torch.zeros(t[k].shape[0], t[k].shape[1] + 1)}


REFUSALS = {  # name: (config edits, tensor edit, message)
    "dora": ({"use_dora": True}, None, "use_dora"),
    "modules_to_save": ({"modules_to_save": ["lm_head", "embed_tokens"]}, None, "modules_to_save"),
    "bias": ({"bias": "lora_only"}, None, "bias = 'lora_only'"),
    "no_such_module": (None, _rename("layers.0.", "layers.9."), "has no module model.language_model.layers.9"),
    "shape": (None, _reshape, "do not fit"),
    "untargeted": ({"target_modules": ["q_proj"]}, None, "does not match"),
    "rank_pattern": ({"rank_pattern": {"k_proj": 2}}, None, "rank r = 2"),
    "embedding": (None, _rename("self_attn.q_proj.lora_A", "self_attn.q_proj.lora_embedding_A"), "embedding"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_field(case, good_adapter, meta_model, tmp_path):
    config, tensors, message = REFUSALS[case]
    with pytest.raises(LoRAError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_adapter(_edited(good_adapter, tmp_path / "a", config, tensors), meta_model)


def test_max_rank(good_adapter, meta_model, tiny_ckpt, tmp_path):
    assert read_adapter(good_adapter, meta_model, max_rank=4).max_rank == 4
    with pytest.raises(LoRAError, match=r"rank 4, above max_lora_rank = 2 \(--max-lora-rank\)"):
        read_adapter(good_adapter, meta_model, max_rank=2)
    with pytest.raises(LoRAError, match="max_lora_rank"):
        merge(tiny_ckpt, good_adapter, tmp_path / "m", max_rank=2)
    assert not (tmp_path / "m").exists()


def test_vision_tower_modules_refused(tiny_ckpt, meta_model, tmp_path):
    """all-linear on the multimodal class adapts the vision tower too: refused, naming the modules."""
    _, folder = make_adapter(tiny_ckpt, False, tmp_path / "a", r=2, lora_alpha=2, target_modules="all-linear")
    with pytest.raises(LoRAError, match=r"vision-tower modules.*model\.visual\.blocks\.0\.attn\.proj"):
        read_adapter(folder, meta_model)
    with pytest.raises(LoRAError, match="vision-tower"):
        LLM(str(tiny_ckpt), dtype="float32", device="cpu", lora=folder)


def test_gguf_base_refused(tiny_ckpt, good_adapter, tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf_writer import write_gguf

    from deltarun.weights.gguf_meta import sidecar_for
    from deltarun.weights.loader import load_model

    write_gguf(tiny_ckpt, tmp_path / "m.gguf", Q.F32)
    side = sidecar_for(tmp_path / "m.gguf")
    with pytest.raises(LoRAError, match="GGUF base"):
        read_adapter(good_adapter, load_model(side, dtype="float32", device="cpu"))
    with pytest.raises(LoRAError, match="GGUF base"):
        merge(side, good_adapter, tmp_path / "merged")


def test_quantized_base_takes_the_adapter(tiny_ckpt, good_peft):
    """int8 weights (ops/quant.py QuantLinear) carry the same delta hook: what the layer adds once the adapter is
    applied is peft's LoRA output for that module."""
    from deltarun.ops.quant import QuantLinear
    from deltarun.weights.loader import load_model
    from deltarun.weights.lora import load_lora

    ref, folder = good_peft
    model = load_model(tiny_ckpt, dtype="float32", device="cpu", quantization="int8")
    proj = model.model.language_model.layers[1].self_attn.q_proj
    assert isinstance(proj, QuantLinear)
    x = torch.randn(3, 64)
    before = proj(x)
    load_lora(folder, model)
    peft_proj = ref.base_model.model.model.language_model.layers[1].self_attn.q_proj
    with torch.no_grad():
        want = peft_proj(x) - peft_proj.base_layer(x)
    torch.testing.assert_close(proj(x) - before, want, rtol=1e-5, atol=1e-5)


def test_async_llm_takes_the_adapter(tiny_ckpt, good_peft):
    import asyncio

    from deltarun.async_llm import AsyncLLM

    ref, folder = good_peft
    llm = AsyncLLM(str(tiny_ckpt), dtype="float32", device="cpu", lora=folder)
    ids = _ids(1024, seed=7)
    try:
        out = asyncio.run(llm.generate(ids, SamplingParams(temperature=0, max_tokens=N_GEN, prompt_logprobs=0,
                                                           ignore_eos=True)))
    finally:
        llm.shutdown()
    lp = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])])
    assert (lp - _ref_logprobs(ref, ids)).abs().max() <= 1e-4
    assert out.outputs[0].token_ids == _ref_greedy(ref, ids)
