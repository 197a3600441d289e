"""Numerical parity with Hugging Face transformers' qwen3_5 (the reference), same random weights, fp32.

prompt_logprobs from deltarun's public API must match transformers' log-softmax to 1e-4, and 64 greedy
tokens must be identical, for several tiny configs that keep every structural feature and for prompt
lengths around and beyond the DeltaNet chunk size (64) and the engine's prefill chunk.
"""
import pytest
import torch
from transformers import Qwen3_5ForCausalLM as HFCausalLM
from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

from deltarun import LLM, SamplingParams

PROMPT_LENS = [1, 5, 64, 150]


def _hf(folder):
    return Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def _prompt(n, vocab, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(ref, ids, n):
    x = torch.tensor([ids])
    # an explicit mask: otherwise generate() masks prompt tokens equal to pad_token_id
    with torch.no_grad():
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _hf_logprobs(ref, ids):
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _ours_logprobs(out):
    assert out.prompt_logprobs[0] is None
    return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])])


@pytest.mark.parametrize("variant", ["hybrid", "untied_gqa4", "equal_heads"])
def test_prompt_logprobs_and_greedy_match_transformers(tiny_ckpts, variant):
    folder = tiny_ckpts[variant]
    ref = _hf(folder)
    llm = LLM(str(folder), dtype="float32", device="cpu", max_prefill_tokens=50)
    vocab = llm.config.text.vocab_size
    for n in PROMPT_LENS:
        ids = _prompt(n, vocab, seed=n)
        out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=64, prompt_logprobs=3,
                                               ignore_eos=True))[0]
        if n > 1:
            diff = (_ours_logprobs(out) - _hf_logprobs(ref, ids)).abs().max().item()
            assert diff < 1e-4, f"{variant} len {n}: max |Δ logprob| {diff}"
        hf_tokens = _hf_greedy(ref, ids, 64)
        assert out.outputs[0].token_ids == hf_tokens, f"{variant} len {n}: greedy tokens differ"
        assert out.outputs[0].finish_reason == "length"


def test_flat_text_checkpoint_from_transformers(tmp_path):
    """A text-only checkpoint saved by transformers' Qwen3_5ForCausalLM (`model.layers.*` names)."""
    cfg = Qwen3_5TextConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=8,
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"],
        num_hidden_layers=4, vocab_size=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    torch.manual_seed(0)
    ref = HFCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # zero-initialised norms would hide a missing (1 + w)
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 2:  # transformers' std 0.02 init makes near-ties that any rounding flips
                p.normal_(0, p.shape[1] ** -0.5)
    ref.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu")
    ids = _prompt(90, 512, seed=3)
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=0, ignore_eos=True))[0]
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([ids])).logits[0]
    hf_tokens = _hf_greedy(ref, ids, 16)
    lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert (_ours_logprobs(out) - lp).abs().max() < 1e-4
    assert out.outputs[0].token_ids == hf_tokens


@pytest.mark.slow
def test_real_0_8b_shape(real_08b_ckpt):
    """The full Qwen3.5-0.8B config shape (random weights, bf16 on disk as published), short prompt."""
    folder = real_08b_ckpt
    llm = LLM(str(folder), dtype="float32", device="cpu")
    ids = _prompt(24, 248_000, seed=7)
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True))[0]
    ours = _ours_logprobs(out)
    del llm
    ref = _hf(folder)
    assert (ours - _hf_logprobs(ref, ids)).abs().max() < 1e-4
    hf_tokens = _hf_greedy(ref, ids, 8)
    assert out.outputs[0].token_ids == hf_tokens


YARN = {"mrope_interleaved": True, "mrope_section": [2, 1, 1], "rope_type": "yarn", "rope_theta": 10000,
        "partial_rotary_factor": 0.25, "factor": 4.0, "original_max_position_embeddings": 64}


def test_yarn_matches_transformers(tmp_path):
    """YaRN from the config (the 4B card's recipe, scaled down) and the same via a load-time override."""
    from tiny import make_checkpoint, tiny_config

    yarn_dir = make_checkpoint(tmp_path / "yarn", tiny_config(rope_parameters=YARN), seed=21)
    plain_dir = make_checkpoint(tmp_path / "plain", tiny_config(), seed=21)  # same weights, default rope
    ref = _hf(yarn_dir)
    ids = _prompt(150, 1024, seed=9)
    expected = _hf_logprobs(ref, ids)
    params = SamplingParams(temperature=0, max_tokens=24, prompt_logprobs=0, ignore_eos=True)
    hf_tokens = _hf_greedy(ref, ids, 24)
    for llm in (LLM(str(yarn_dir), dtype="float32", device="cpu"),
                LLM(str(plain_dir), dtype="float32", device="cpu",
                    rope_scaling={k: YARN[k] for k in ("rope_type", "factor", "original_max_position_embeddings")})):
        out = llm.generate(ids, params)[0]
        assert (_ours_logprobs(out) - expected).abs().max() < 1e-4
        assert out.outputs[0].token_ids == hf_tokens
    plain = LLM(str(plain_dir), dtype="float32", device="cpu").generate(ids, params)[0]
    assert (_ours_logprobs(plain) - expected).abs().max() > 1e-3  # YaRN really changes the numbers


def test_context_length_beyond_native_needs_yarn(tiny_ckpt):
    from deltarun.weights.loader import LoadError

    with pytest.raises(LoadError, match="enable YaRN"):
        LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=10_000)
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=16_000, rope_scaling="yarn:4")
    assert llm.engine.max_model_len == 16_000
