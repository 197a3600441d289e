"""Many LoRA adapters in one engine (engine/adapters.py, ops/lora.py): each request with its own adapter, batched.

The property under test: a request's output does not depend on what it is batched with. Each request run in a
mixed batch (three adapters of different ranks and targets, and one without) equals the same request run alone,
greedy and seeded, while each decode step is one model forward over all rows; a request run alone with an
adapter equals transformers + peft (tests/test_lora.py holds that check, repeated here for one adapter).
Also: fewer slots than adapters (`max_loras`), prefix-cache entries kept apart per adapter, MTP speculation
with an adapter equal to plain decoding, a quantized base, and the refusals.
"""
from __future__ import annotations

import random

import pytest
import torch
from lora_helpers import _ids, _ref_greedy, _ref_logprobs, make_adapter

from deltarun import LLM, LoRARequest, SamplingParams
from deltarun.weights.lora_config import LoRAError

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
GDN = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]
N_GEN = 20


@pytest.fixture(scope="module")
def adapters(tiny_ckpt, tmp_path_factory):
    """Three peft adapters of ranks 4, 8 and 2 on different module families; {name: (PeftModel, LoRARequest)}."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {"attn4": dict(r=4, lora_alpha=8, target_modules=ATTN),
             "mlp8": dict(r=8, lora_alpha=16, target_modules=MLP + ["in_proj_a"]),
             "gdn2": dict(r=2, lora_alpha=8, use_rslora=True, target_modules=GDN + ["o_proj"])}
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        ref, folder = make_adapter(tiny_ckpt, False, root / name, seed=10 + i, **spec)
        out[name] = (ref, LoRARequest(name, i + 1, str(folder)))
    return out


def _llm(ckpt, **kw):
    kw.setdefault("prefix_cache_memory", 0)
    return LLM(str(ckpt), dtype="float32", device="cpu", **kw)


def _run(llm, prompts, params, loras):
    outs = llm.generate(prompts, params, lora_request=loras)
    return [o.outputs[0] for o in outs]


PROMPTS = [_ids(1024, seed=s)[: 12 + 7 * s] for s in range(4)]


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_mixed_batch_equals_each_request_alone(tiny_ckpt, adapters, mode):
    loras = [adapters["attn4"][1], adapters["mlp8"][1], None, adapters["gdn2"][1]]
    params = [SamplingParams(temperature=0, max_tokens=N_GEN, ignore_eos=True, logprobs=0) if mode == "greedy"
              else SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=N_GEN, ignore_eos=True,
                                  logprobs=0) for i in range(4)]
    llm = _llm(tiny_ckpt, max_loras=4)
    eng = llm.engine
    trace = []  # (forwards this step, rows decoding)
    real_step = eng.step

    def step():
        before, rows = eng.stats["forwards"], sum(1 for s in eng.active if s.decoding)
        out = real_step()
        trace.append((eng.stats["forwards"] - before, rows, len(eng.queue)))
        return out
    eng.step = step
    batched = _run(llm, PROMPTS, params, loras)
    # once every prompt is in, each step is ONE forward over all four rows, whatever their adapters
    decode_only = [(f, rows) for f, rows, waiting in trace if waiting == 0 and rows == 4]
    assert len(decode_only) >= N_GEN - 5 and all(f == 1 for f, _ in decode_only)
    assert eng.adapters.loads == 3
    alone_llm = _llm(tiny_ckpt, max_loras=4)
    for i in range(4):
        alone = _run(alone_llm, [PROMPTS[i]], [params[i]], [loras[i]])[0]
        assert batched[i].token_ids == alone.token_ids, f"request {i}"
        lp_b = torch.tensor([d[t].logprob for d, t in zip(batched[i].logprobs, batched[i].token_ids)])
        lp_a = torch.tensor([d[t].logprob for d, t in zip(alone.logprobs, alone.token_ids)])
        # 5e-4: the base model alone already moves ~1e-4 between batch shapes in fp32 (other reduction orders)
        assert (lp_b - lp_a).abs().max() <= 5e-4
    # the rows really ran different models: each adapter changes its request's tokens
    base = _run(alone_llm, PROMPTS, params, None)
    assert batched[2].token_ids == base[2].token_ids
    assert sum(batched[i].token_ids != base[i].token_ids for i in (0, 1, 3)) >= 2


def test_each_adapter_in_a_mixed_batch_matches_peft(tiny_ckpt, adapters):
    """Not only self-consistent: in the mixed batch, the rank-8 adapter's prompt log-probs are peft's."""
    llm = _llm(tiny_ckpt)
    ids = _ids(1024, seed=9)
    params = SamplingParams(temperature=0, max_tokens=N_GEN, prompt_logprobs=0, ignore_eos=True)
    names = ["attn4", "mlp8", "gdn2"]
    outs = llm.generate([ids] * 3, params, lora_request=[adapters[n][1] for n in names])
    for name, out in zip(names, outs):
        ref = adapters[name][0]
        lp = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])])
        assert (lp - _ref_logprobs(ref, ids)).abs().max() <= 1e-4, name
        assert out.outputs[0].token_ids == _ref_greedy(ref, ids, N_GEN), name


def test_fewer_slots_than_adapters(tiny_ckpt, adapters):
    """max_loras=2 with three adapters and a base request: a sequence whose adapter does not fit waits (others
    pass it), no forward mixes more than two adapters, and every output equals its run alone."""
    loras = [adapters["attn4"][1], adapters["mlp8"][1], adapters["gdn2"][1], None, adapters["attn4"][1]]
    prompts = PROMPTS + [PROMPTS[0][:9]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = _llm(tiny_ckpt, max_loras=2)
    widths = []
    real = llm.engine.adapters.slots
    llm.engine.adapters.slots = lambda names: widths.append(len({n for n in names if n})) or real(names)
    batched = _run(llm, prompts, params, loras)
    assert max(widths) == 2
    assert llm.engine.adapters.loads >= 3  # a slot was reused for the third adapter
    alone = _llm(tiny_ckpt, max_loras=1)
    for i in range(len(prompts)):
        assert batched[i].token_ids == _run(alone, [prompts[i]], params, [loras[i]])[0].token_ids


def test_prefix_cache_entries_are_kept_apart_per_adapter(tiny_ckpt, adapters):
    ids = _ids(1024, seed=3)[:40] * 4  # 160 tokens: two whole 64-token blocks are cached
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = _llm(tiny_ckpt, prefix_cache_memory=1 << 26)
    fresh = _llm(tiny_ckpt)
    a, b = adapters["attn4"][1], adapters["mlp8"][1]
    first = _run(llm, [ids], params, [a])[0]
    hits = llm.engine.prefix.hits
    for lora in (b, None):  # the same tokens under another adapter (or none) must not reuse a's states
        assert _run(llm, [ids], params, [lora])[0].token_ids == _run(fresh, [ids], params, [lora])[0].token_ids
        assert llm.engine.prefix.hits == hits
    again = _run(llm, [ids], params, [a])[0]  # a's own entry is reused
    assert llm.engine.prefix.hits == hits + 1 and again.token_ids == first.token_ids


def test_mtp_speculation_with_an_adapter_is_lossless(tiny_ckpt, adapters):
    """Drafts come from the MTP head (no adapter); the verify forward runs the adapter, so greedy output equals
    plain decoding with the adapter. Some drafts are made right (the plain run's own tokens) so that both the
    accept and the reject paths run."""
    loras = [adapters["mlp8"][1], None, adapters["gdn2"][1]]
    params = SamplingParams(temperature=0, max_tokens=N_GEN, ignore_eos=True)
    plain = [o.token_ids for o in _run(_llm(tiny_ckpt, mtp="off"), PROMPTS[:3], params, loras)]
    llm = _llm(tiny_ckpt, mtp="on", num_speculative_tokens=2, mtp_draft_vocab=0)
    spec, rng = llm.engine.spec, random.Random(0)
    inner, refs = spec._draft, {tuple(p): t for p, t in zip(PROMPTS, plain)}

    def draft(seqs, budgets):
        drafts, qs = inner(seqs, budgets)
        for s, d in zip(seqs, drafts):
            ref, n = refs[tuple(s.request.prompt_ids)], len(s.token_ids)
            for j in range(len(d)):
                if n + j < len(ref) and rng.random() < 0.7:
                    d[j] = ref[n + j]
        return drafts, qs
    spec._draft = draft
    assert [o.token_ids for o in _run(llm, PROMPTS[:3], params, loras)] == plain
    assert llm.engine.stats["spec_accepted"] > 0 and llm.engine.stats["spec_drafted"] > llm.engine.stats[
        "spec_accepted"]


def test_quantized_base_with_adapters(tiny_ckpt, adapters):
    """An int8 base with adapters in a mixed batch equals the fp32 model holding the int8-dequantized weights,
    with the same adapters (the quantization tests' bound, 1e-4 on log-probs)."""
    from deltarun.ops.quant import dequantize_int8, quantize_int8
    from deltarun.weights import quantize as quant

    loras = [adapters["attn4"][1], adapters["mlp8"][1], None]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    q = _llm(tiny_ckpt, quantization="int8")
    ref = _llm(tiny_ckpt)
    spec = quant.QuantSpec.parse("int8")
    with torch.no_grad():
        for name, p in ref.model.named_parameters():
            if quant.is_quantizable(name, tuple(p.shape), spec):
                p.copy_(dequantize_int8(*quantize_int8(p)))
    got, want = _run(q, PROMPTS[:3], params, loras), _run(ref, PROMPTS[:3], params, loras)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        lg = torch.tensor([d[t].logprob for d, t in zip(g.logprobs, g.token_ids)])
        lw = torch.tensor([d[t].logprob for d, t in zip(w.logprobs, w.token_ids)])
        assert (lg - lw).abs().max() <= 1e-4


def test_refusals(tiny_ckpt, adapters, tmp_path):
    llm = _llm(tiny_ckpt, max_lora_rank=4)
    with pytest.raises(LoRAError, match="above max_lora_rank = 4"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2), lora_request=adapters["mlp8"][1])
    assert "mlp8" not in llm.list_loras()  # nothing half-registered
    attn = adapters["attn4"][1]
    llm.generate([1, 2, 3], SamplingParams(max_tokens=2), lora_request=attn)
    with pytest.raises(LoRAError, match="already bound to another folder"):
        llm.add_lora(LoRARequest("attn4", 9, adapters["gdn2"][1].lora_path))
    with pytest.raises(LoRAError, match="adapter name"):
        llm.add_lora(LoRARequest("../x y", 9, attn.lora_path))
    with pytest.raises(LoRAError, match="adapter_config.json"):
        llm.add_lora(LoRARequest("empty", 9, str(tmp_path)))
    with pytest.raises(ValueError, match="unknown adapter"):
        llm.engine.add_request("r", [1, 2], SamplingParams(max_tokens=1).with_defaults({}), adapter="nope")
    with pytest.raises(ValueError, match="2 LoRARequests for 1 prompts"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=1), lora_request=[attn, attn])
    with pytest.raises(ValueError, match="max_cpu_loras"):
        _llm(tiny_ckpt, max_loras=4, max_cpu_loras=2)
