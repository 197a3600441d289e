"""Invariants of the model and engine: ways of running the same tokens must agree.

chunked prefill == one-shot prefill == token-by-token decode; prefill then decode == full forward;
several sequences' chunks packed into one forward == each on its own; n samples forked from one prefill ==
separate requests; bf16 close to fp32.
"""
import pytest
import torch

from deltarun import LLM, SamplingParams
from deltarun.weights.loader import load_model


def _ids(n, vocab=1024, seed=0):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt, dtype="float32", device="cpu")


@torch.no_grad()
def test_chunked_oneshot_tokenwise_agree(model):
    ids = _ids(150)
    one = model.logits(model(ids, model.new_cache()))
    cache, pieces = model.new_cache(), []
    for a, b in [(0, 7), (7, 64), (64, 65), (65, 140), (140, 150)]:
        pieces.append(model.logits(model(ids[:, a:b], cache)))
    chunked = torch.cat(pieces, 1)
    cache, steps = model.new_cache(), []
    for i in range(150):
        steps.append(model.logits(model(ids[:, i:i + 1], cache)))
    tokenwise = torch.cat(steps, 1)
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokenwise, one, atol=1e-4, rtol=1e-4)
    assert cache.length == 150


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(model):
    ids = _ids(90, seed=1)
    cache = model.new_cache()
    model(ids[:, :80], cache)
    dec = torch.cat([model.logits(model(ids[:, i:i + 1], cache)) for i in range(80, 90)], 1)
    full = model.logits(model(ids, model.new_cache()))[:, 80:]
    torch.testing.assert_close(dec, full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_packed_prefill_equals_each_sequence_alone(model):
    """Chunks of three sequences in one packed forward (one mid-prompt, one a single token, one fresh; pool
    slots out of order) give each one's hidden states and leave each one's state as forwards of its own."""
    from deltarun.cache.state import KVCache, ModelCache, SeqState

    a, b, c = _ids(120, seed=3), _ids(1, seed=4), _ids(45, seed=5)
    pool = model.new_pool(4)
    slots = [pool.alloc() for _ in range(4)][::-1][:3]  # 3, 2, 1: not a consecutive slice
    seqs = [SeqState(s, [KVCache() for _ in range(model.num_kv_layers)]) for s in slots]
    model(a[:, :50], ModelCache(pool, [seqs[0]]))  # sequence a is mid-prompt
    chunks = [a[:, 50:120], b, c]
    packed = model(torch.cat(chunks, 1), ModelCache(pool, seqs, seq_lens=[70, 1, 45]))
    alone_cache = [model.new_cache() for _ in range(3)]
    model(a[:, :50], alone_cache[0])
    alone = [model(x, cache) for x, cache in zip(chunks, alone_cache)]
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    assert [s.length for s in seqs] == [120, 1, 45]
    nxt = _ids(3, seed=6)  # the states they were left in: a decode step of all three
    dec = model.logits(model(nxt.view(3, 1), ModelCache(pool, seqs)))
    ref = torch.cat([model.logits(model(nxt[:, i:i + 1], cache)) for i, cache in enumerate(alone_cache)])
    torch.testing.assert_close(dec, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="packed forward"):
        model(torch.cat(chunks, 1), ModelCache(pool, seqs, seq_lens=[70, 1, 44]))


def test_engine_prefill_chunk_size_does_not_matter(tiny_ckpt):
    ids = _ids(130, seed=2)[0].tolist()
    params = SamplingParams(temperature=0, max_tokens=20, prompt_logprobs=0, ignore_eos=True)
    outs = [LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_prefill_tokens=m).generate(ids, params)[0]
            for m in (7, 64, 1000)]
    lps = [torch.tensor([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], ids[1:])]) for o in outs]
    for o, lp in zip(outs[1:], lps[1:]):
        torch.testing.assert_close(lp, lps[0], atol=1e-4, rtol=0)
        assert o.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_forked_samples_equal_separate_requests(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu")
    ids = _ids(40, seed=3)[0].tolist()
    forked = llm.generate(ids, SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True))[0]
    for i, out in enumerate(forked.outputs):
        alone = llm.generate(ids, SamplingParams(temperature=1.0, seed=11 + i, max_tokens=12, ignore_eos=True))[0]
        assert out.token_ids == alone.outputs[0].token_ids
    assert len({tuple(o.token_ids) for o in forked.outputs}) > 1


def test_bf16_close_to_fp32(tiny_ckpt):
    """bf16 drifts from fp32 no more than transformers' own bf16 does on the same weights."""
    from transformers import Qwen3_5ForConditionalGeneration

    ids = _ids(100, seed=4)
    with torch.no_grad():
        m32 = load_model(tiny_ckpt, dtype="float32", device="cpu")
        m16 = load_model(tiny_ckpt, dtype="bfloat16", device="cpu")
        lp32 = torch.log_softmax(m32.logits(m32(ids, m32.new_cache())), -1)
        lp16 = torch.log_softmax(m16.logits(m16(ids, m16.new_cache())), -1)
        hf16 = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
        lp_hf = torch.log_softmax(hf16(input_ids=ids).logits.float(), -1)
    p32 = lp32.exp()

    def drift(lp):  # mean |Δ logprob| weighted by the fp32 distribution
        return (p32 * (lp32 - lp).abs()).sum(-1).mean().item()

    assert drift(lp16) < 0.05
    assert drift(lp16) <= 1.5 * drift(lp_hf) + 1e-3
