"""Tests for deltarun.sampling (SamplingParams, card defaults) and deltarun.ops.sampling
(batched sampler), checked against transformers' logits processors, the OpenAI penalty
formula, and empirical draw frequencies."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from deltarun.ops.sampling import (
    RACE_MAX,
    SamplerState,
    _penalize_,
    draw,
    inverse_cdf,
    process_logits,
    prompt_logprobs,
    sample,
    top_k_candidates,
)
from deltarun.sampling import CARD_DEFAULTS, SamplingParams, card_defaults

CPU = torch.device("cpu")


def _state(prompt=(), vocab=64, device=CPU, eos=(), **kw) -> SamplerState:
    return SamplerState(SamplingParams(**kw).with_defaults({}), list(prompt), vocab, device, eos)


def _hf_reference(logits: torch.Tensor, prompt: list[int], p: SamplingParams) -> torch.Tensor:
    """The same chain built from transformers' processors (HF order), fp32 [1, V]."""
    ids = torch.tensor([prompt], dtype=torch.long)
    x = logits.float().unsqueeze(0).clone()
    chain = []
    if p.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        chain.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        chain.append(MinPLogitsWarper(p.min_p))
    for proc in chain:
        x = proc(ids, x)
    return x


HF_CASES = [
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(min_p=0.1),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8),
    dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=0.6, top_k=20, top_p=0.95),
    dict(temperature=0.5, top_p=0.3, min_p=0.2),
]


@pytest.mark.parametrize("kw", HF_CASES)
def test_matches_transformers_processors(kw):
    g = torch.Generator().manual_seed(0)
    V = 97
    prompt = torch.randint(0, V, (30,), generator=g).tolist()
    for trial in range(4):
        logits = torch.randn(V, generator=g) * 3
        p = SamplingParams(**kw).with_defaults({})
        ours = process_logits(logits.unsqueeze(0), [SamplerState(p, prompt, V, CPU)])
        ref = _hf_reference(logits, prompt, p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref)), (kw, trial)
        torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), rtol=1e-5, atol=1e-7)


def test_mixed_batch_equals_rows_alone():
    g = torch.Generator().manual_seed(1)
    V = 97
    prompt = [1, 2, 3, 50]
    logits = torch.randn(len(HF_CASES) + 2, V, generator=g) * 2
    kws = HF_CASES + [dict(temperature=0), dict(presence_penalty=1.0, frequency_penalty=0.5)]
    states = [_state(prompt, V, **kw) for kw in kws]
    for s in states:
        s.append(7), s.append(7), s.append(9)
    batched = process_logits(logits, states)
    for i, s in enumerate(states):
        alone = process_logits(logits[i : i + 1], [s])
        torch.testing.assert_close(batched[i : i + 1], alone)


def test_presence_frequency_openai_formula():
    # OpenAI: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence, over output tokens.
    V, pres, freq = 20, 0.7, -0.4
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(V, generator=g)
    prompt = [0, 1, 2]  # prompt tokens must not be penalized
    out = [3, 3, 3, 5, 7, 5]
    s = _state(prompt, V, presence_penalty=pres, frequency_penalty=freq)
    for t in out:
        s.append(t)
    ours = process_logits(logits.unsqueeze(0), [s])[0]
    expect = []
    for j in range(V):
        c = out.count(j)
        expect.append(logits[j].item() - c * freq - (1.0 if c > 0 else 0.0) * pres)
    torch.testing.assert_close(ours, torch.tensor(expect), rtol=0, atol=1e-6)


def test_repetition_penalty_covers_prompt_and_output():
    V = 10
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    s = _state([0, 1], V, repetition_penalty=2.0)
    s.append(2), s.append(3)
    ours = process_logits(logits.unsqueeze(0), [s])[0]
    assert ours[:4].tolist() == [1.0, -4.0, 1.0, -4.0]
    assert ours[4:].tolist() == [1.0] * 6


def test_greedy_at_temperature_zero():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 64, generator=g)
    states = [_state(vocab=64, temperature=0.0, top_k=3, top_p=0.5) for _ in range(4)]
    for _ in range(3):
        out = sample(logits, states)
        assert torch.equal(out.token_ids, logits.argmax(-1))
    assert all(s.generator is None for s in states)  # greedy never consumes randomness


def test_vocab_limit_binds_greedy_rows_too():
    """Ids past vocab_limit (the embedding's padding rows) are never picked, by the bare-argmax path of
    plain greedy rows as by processed ones; logprobs stay those of the full distribution."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    logits[:, 60] = 50.0  # the best id lies in the padding
    for kw in ({"temperature": 0.0}, {"temperature": 0.0, "repetition_penalty": 1.5}):
        out = sample(logits, [_state(prompt=[1], vocab=64, **kw) for _ in range(3)], vocab_limit=50)
        assert torch.equal(out.token_ids, logits[:, :50].argmax(-1))
        want = torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None]).squeeze(1)
        torch.testing.assert_close(out.logprobs, want)
    wide = torch.randn(4, 800, generator=torch.Generator().manual_seed(5))
    wide[:, 700:] = 50.0  # sampled rows with a top-k (the k-best path) and without one (the full path)
    for kw in ({"temperature": 1.0, "top_k": 20}, {"temperature": 1.0, "top_k": 20, "repetition_penalty": 1.2},
               {"temperature": 1.0}):
        out = sample(wide, [_state(prompt=[1], vocab=800, seed=i, **kw) for i in range(4)], vocab_limit=600)
        assert bool((out.token_ids < 600).all())


def test_greedy_sees_penalties():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    s = _state([0], 4, temperature=0.0, repetition_penalty=1.5)
    assert sample(logits, [s]).token_ids.item() == 1


def _run(seed, steps=25, V=500, **kw) -> list[int]:
    g = torch.Generator().manual_seed(123)
    s = _state(vocab=V, seed=seed, **kw)
    toks = []
    for _ in range(steps):
        t = sample(torch.randn(1, V, generator=g), [s]).token_ids.item()
        s.append(t)
        toks.append(t)
    return toks


def test_seed_reproducibility():
    a, b, c = _run(42), _run(42), _run(43)
    assert a == b
    assert a != c
    assert _run(7, presence_penalty=1.0, top_p=0.9) == _run(7, presence_penalty=1.0, top_p=0.9)


def test_seeded_row_independent_of_batch_neighbours():
    V = 300
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, V, generator=g)
    alone = sample(logits[1:2], [_state(vocab=V, seed=5)]).token_ids.item()
    neighbours = [_state(vocab=V), _state(vocab=V, seed=5), _state(vocab=V, temperature=0)]
    mixed = sample(logits, neighbours)
    assert mixed.token_ids[1].item() == alone


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_k=5, top_p=0.9),
                                dict(min_p=0.2, temperature=1.5)])
def test_empirical_frequencies(kw):
    V, N = 8, 6000
    logits = torch.tensor([1.5, 1.0, 0.8, 0.2, 0.0, -0.5, -1.0, -3.0])
    states = [_state(vocab=V, seed=i, **kw) for i in range(N)]
    batch = logits.expand(N, V)
    probs = process_logits(batch[:1], states[:1])[0].softmax(-1)
    counts = torch.bincount(sample(batch, states).token_ids, minlength=V).double()
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
    keep = probs > 0
    expected = probs[keep].double() * N
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    df = int(keep.sum()) - 1
    # Far beyond the 99.9% quantile for df <= 7 (24.3): a wrong distribution gives hundreds.
    assert chi2 < df + 6 * math.sqrt(2 * max(df, 1)) + 10, (chi2, df)


def test_draw_follows_the_distribution():
    """`draw` against the distribution it is given, by the race (few entries) and by the inverse CDF (a
    vocabulary): unnormalised, with zeros inside and at both ends (never drawn), reproducible per seed."""
    w = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 2.5, 0.0, 0.0])
    g, N = torch.Generator().manual_seed(3), 8000
    counts = torch.bincount(torch.tensor([draw(w, g) for _ in range(N)]), minlength=len(w)).double()
    assert counts[w == 0].sum() == 0
    keep = w > 0
    expected = (w / w.sum())[keep].double() * N
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    assert chi2 < 3 + 6 * math.sqrt(6) + 10, chi2  # df 3; a wrong distribution gives hundreds
    seq = [draw(w, torch.Generator().manual_seed(9)) for _ in range(3)]
    assert len(set(seq)) == 1
    # a vocabulary-sized row: the mass of the first half of a peaked distribution, 2,000 draws
    big = torch.full((248_320,), 1e-6)
    big[:100] = 1.0
    got = [draw(big, g) for _ in range(2000)]
    assert len(big) > RACE_MAX  # the inverse CDF's case
    share = 100 / (100 + 1e-6 * (248_320 - 100))
    assert abs(sum(i < 100 for i in got) / 2000 - share) < 0.03


def test_draw_never_returns_a_zero_entry_when_u_rounds_to_the_total(monkeypatch):
    """u = rand · total can round onto the total itself: the last entry that can be drawn, not a zero one past
    it."""
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1, dtype=torch.float64))
    assert inverse_cdf(torch.tensor([0.2, 0.5, 0.3, 0.0, 0.0])) == 2


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=20, top_p=0.8),
                                dict(temperature=1.3, top_k=50, min_p=0.05),
                                dict(temperature=1.0, top_k=5),
                                dict(temperature=0.9, top_k=100, top_p=0.95, repetition_penalty=1.3,
                                     presence_penalty=0.5, frequency_penalty=0.2)])
def test_top_k_rows_sample_from_the_full_paths_distribution(kw):
    """A row with a top-k is sampled from its k best tokens alone (`top_k_candidates`): the tokens and the
    probabilities are those of softmax(process_logits(row)), the full-vocabulary path transformers is checked
    against above; and `sample` draws with those frequencies."""
    V = 2000
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(1, V, generator=g) * 4
    st = _state(prompt=[3, 9, 27], vocab=V, seed=1, **kw)
    for t in (3, 3, 500):
        st.append(t)
    want = process_logits(logits, [st])[0].softmax(-1)
    row = logits[0].clone()
    _penalize_(row, st)
    got = top_k_candidates(row, st)
    assert got is not None
    probs, ids = got
    assert set(ids.tolist()) == set(torch.nonzero(want > 0)[:, 0].tolist())
    torch.testing.assert_close(probs, want[ids], rtol=1e-5, atol=1e-7)
    N = 4000
    states = [_state(prompt=[3, 9, 27], vocab=V, seed=100 + i, **kw) for i in range(N)]
    for s_ in states:
        for t in (3, 3, 500):
            s_.append(t)
    counts = torch.bincount(sample(logits.expand(N, V), states).token_ids, minlength=V).double()
    assert counts[want == 0].sum() == 0
    keep = want > 1e-3
    expected = want[keep].double() * N
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    df = int(keep.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * max(df, 1)) + 10, (chi2, df)


def test_a_tie_at_the_kth_value_keeps_every_tied_token():
    """HF's top-k keeps all tokens equal to the k-th value: the k-best path steps aside for the full one."""
    V = 400
    logits = torch.full((1, V), -5.0)
    logits[0, :3] = torch.tensor([4.0, 2.0, 2.0])  # top-2 ties with the third
    st = _state(vocab=V, seed=0, temperature=1.0, top_k=2)
    assert top_k_candidates(logits[0].clone(), st) is None
    seen = {int(sample(logits, [_state(vocab=V, seed=i, temperature=1.0, top_k=2)]).token_ids[0]) for i in range(300)}
    assert seen == {0, 1, 2}


def test_logprobs_are_raw_distribution():
    V = 50
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(3, V, generator=g) * 2).to(torch.bfloat16)
    states = [_state(vocab=V, temperature=0.3, top_k=4, logprobs=5),
              _state(vocab=V, temperature=0, logprobs=0),
              _state(vocab=V, repetition_penalty=1.5, prompt=[1, 2])]
    out = sample(logits, states)
    raw = torch.log_softmax(logits.float(), -1)
    assert out.token_ids.dtype == torch.long and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    top = out.top_logprobs
    assert top is not None and len(top[0]) == 5 and top[1] == [] and top[2] == []
    vals, ids = raw[0].topk(5)
    assert [t for t, _ in top[0]] == ids.tolist()
    torch.testing.assert_close(torch.tensor([v for _, v in top[0]]), vals)
    assert sample(logits[:1], [_state(vocab=V)]).top_logprobs is None


def test_min_tokens_blocks_stop_tokens():
    V = 6
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 50.0]])  # EOS (5) dominates
    s = _state(vocab=V, eos=[5], temperature=0, min_tokens=2, stop_token_ids=[4])
    for _ in range(2):
        t = sample(logits, [s]).token_ids.item()
        assert t not in (4, 5)
        s.append(t)
    assert sample(logits, [s]).token_ids.item() == 5
    s2 = _state(vocab=V, eos=[5], temperature=0, min_tokens=2, ignore_eos=True)
    assert sample(logits, [s2]).token_ids.item() == 5  # EOS stops nothing, so not blocked


def test_prompt_logprobs():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(7, 40, generator=g, dtype=torch.float16)
    nxt = torch.randint(0, 40, (7,), generator=g)
    lp, tops = prompt_logprobs(logits, nxt, 3)
    raw = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(lp, raw[torch.arange(7), nxt])
    assert [len(t) for t in tops] == [3] * 7
    assert [t for t, _ in tops[2]] == raw[2].topk(3).indices.tolist()
    assert prompt_logprobs(logits, nxt, 0)[1] == [[]] * 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_processing():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(len(HF_CASES), 1000, generator=g)
    mk = lambda d: [_state([1, 2, 3], 1000, d, seed=i, **kw) for i, kw in enumerate(HF_CASES)]
    cpu = process_logits(logits, mk(CPU))
    gpu = process_logits(logits.to(dev, torch.bfloat16).float(), mk(dev)).cpu()
    assert torch.equal(torch.isfinite(cpu), torch.isfinite(gpu))
    s1, s2 = mk(dev), mk(dev)
    l16 = logits.to(dev, torch.bfloat16)
    assert torch.equal(sample(l16, s1).token_ids, sample(l16, s2).token_ids)


# ---- SamplingParams ----

BAD = [
    dict(n=0), dict(n=1.5), dict(n=True),
    dict(temperature=-0.1), dict(temperature="1"), dict(temperature=float("nan")),
    dict(top_p=0.0), dict(top_p=1.01),
    dict(top_k=-2), dict(top_k=2.0),
    dict(min_p=-0.01), dict(min_p=1.5),
    dict(presence_penalty=2.5), dict(frequency_penalty=-2.01),
    dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
    dict(seed=1.0), dict(seed=2**64),
    dict(max_tokens=-1), dict(min_tokens=-1), dict(min_tokens=5, max_tokens=4),
    dict(stop=""), dict(stop=[1]), dict(stop_token_ids=[-1]), dict(stop_token_ids=["a"]),
    dict(logprobs=-1), dict(logprobs=21), dict(prompt_logprobs=21),
    dict(ignore_eos=1), dict(skip_special_tokens=None), dict(include_stop_str_in_output="no"),
]


@pytest.mark.parametrize("kw", BAD, ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()))
def test_validation_names_field(kw):
    field = list(kw)[-1] if "min_tokens" not in kw else "min_tokens"
    with pytest.raises(ValueError, match=rf"\b{field}\b") as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)


def test_valid_params_and_normalization():
    p = SamplingParams(temperature=0, top_k=-1, top_p=1, stop="###", seed=0, logprobs=20,
                       max_tokens=0, stop_token_ids=(3, 4))
    assert p.stop == ["###"] and p.stop_token_ids == [3, 4]
    assert isinstance(p.temperature, float) and p.greedy
    assert SamplingParams().stop == [] and SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert not SamplingParams().greedy


def test_with_defaults_fills_only_unset():
    p = SamplingParams(temperature=0.3, top_k=5, max_tokens=10)
    q = p.with_defaults(card_defaults(thinking=True))
    assert (q.temperature, q.top_k, q.top_p, q.presence_penalty) == (0.3, 5, 0.95, 1.5)
    assert (q.min_p, q.repetition_penalty, q.frequency_penalty) == (0.0, 1.0, 0.0)
    assert q.max_tokens == 10 and p.top_p is None  # copy, original untouched
    n = SamplingParams().with_defaults({})
    assert (n.temperature, n.top_p, n.top_k, n.min_p) == (1.0, 1.0, 0, 0.0)
    assert (n.presence_penalty, n.frequency_penalty, n.repetition_penalty) == (0.0, 0.0, 1.0)
    assert SamplingParams().with_defaults({"max_tokens": 32768}).max_tokens == 32768
    with pytest.raises(ValueError, match="tempreature"):
        SamplingParams().with_defaults({"tempreature": 0.5})
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams().with_defaults({"top_p": 2.0})


def test_card_defaults():
    assert card_defaults(True) == {"temperature": 1.0, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                                   "presence_penalty": 1.5, "repetition_penalty": 1.0}
    assert card_defaults(False) == {"temperature": 1.0, "top_p": 1.0, "top_k": 20, "min_p": 0.0,
                                    "presence_penalty": 2.0, "repetition_penalty": 1.0}
    d = card_defaults(True)
    d["top_k"] = 1
    assert CARD_DEFAULTS["thinking"]["top_k"] == 20  # returns a copy
    for mode in CARD_DEFAULTS.values():
        SamplingParams().with_defaults(mode)  # every card row is valid
