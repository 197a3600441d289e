"""MTP speculative decoding: lossless (greedy == plain, sampling keeps the target distribution), exact
state after partial acceptance, clean slot accounting, clear errors.

Random MTP weights accept nothing, so partial acceptance is produced two ways: an *oracle* that puts
the plain run's true next tokens into some draft positions (the rest stay the head's own, wrong,
guesses), and a head self-distilled on the prompts it is then run on (benchmarks/distill_mtp.py).
"""
import random
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_checkpoint, tiny_config

from deltarun import LLM, SamplingParams
from deltarun.cache.state import KVCache
from deltarun.engine.spec_policy import SpecPolicy, rejection_step
from deltarun.weights.mtp_loader import load_mtp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from distill_mtp import distill, greedy_corpus, write_with_head  # noqa: E402

GiB = 1 << 30
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _ids(n, seed):
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(ckpt, **kw):
    kw.setdefault("prefix_cache_memory", 0)
    kw.setdefault("max_memory", GiB)
    return LLM(str(ckpt), dtype="float32", device="cpu", **kw)


def _tokens(outs):
    return [[o.token_ids for o in r.outputs] for r in outs]


def _oracle(llm, refs: dict, rate: float, seed: int = 0):
    """Make some greedy drafts the plain run's true tokens (others keep the head's guess)."""
    spec, rng = llm.engine.spec, random.Random(seed)
    inner = spec._draft

    def draft(seqs, budgets):
        drafts, qs = inner(seqs, budgets)
        for s, d in zip(seqs, drafts):
            ref = refs.get(tuple(s.request.prompt_ids))
            if ref is None or not s.request.params.greedy:
                continue
            n = len(s.token_ids)
            for j in range(len(d)):
                if n + j < len(ref) and rng.random() < rate:
                    d[j] = ref[n + j]
        return drafts, qs
    spec._draft = draft


def _free(llm):
    e = llm.engine
    return len(e.pool.free_slots) == e.pool.num_slots and not e.active and not e.requests


PROMPTS = [_ids(n, seed=n) for n in (3, 70, 129, 20, 90, 65)]


BATCH_PARAMS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (24, 7, 30, 1, 18, 12)]


@pytest.fixture(scope="module")
def plain_batch(tiny_ckpt):
    return _tokens(_llm(tiny_ckpt, mtp="off").generate(PROMPTS, BATCH_PARAMS))


@pytest.mark.parametrize("rate,k,draft_vocab", [(0.0, 2, 0), (0.6, 3, 0), (1.0, 4, 0), (0.7, 2, 300)])
def test_greedy_mtp_equals_plain_batched(tiny_ckpt, plain_batch, rate, k, draft_vocab):
    params, plain = BATCH_PARAMS, plain_batch
    llm = _llm(tiny_ckpt, mtp="on", num_speculative_tokens=k, max_prefill_tokens=64, max_num_seqs=4,
               mtp_draft_vocab=draft_vocab)
    assert (llm.engine.spec.draft_head is not None) == (draft_vocab > 0)
    _oracle(llm, {tuple(p): r[0] for p, r in zip(PROMPTS, plain)}, rate, seed=k)
    assert _tokens(llm.generate(PROMPTS, params)) == plain
    st = llm.engine.stats
    assert st["spec_steps"] > 0 and (st["spec_accepted"] > 0) == (rate > 0)
    assert _free(llm)


def test_greedy_mtp_with_penalties_equals_plain(tiny_ckpt):
    """Greedy rows that need logits processing (repetition/presence penalties, a min_tokens ban) take the
    full-vocabulary path beside plain greedy rows, which argmax the draft vocabulary's logits directly."""
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, presence_penalty=1.0, frequency_penalty=0.5, min_tokens=6,
                             ignore_eos=True, stop_token_ids=[int(PROMPTS[2][0])])]
    plain = _tokens(_llm(tiny_ckpt, mtp="off").generate(PROMPTS[:3], params))
    llm = _llm(tiny_ckpt, mtp="on", num_speculative_tokens=3, max_num_seqs=4, mtp_draft_vocab=300)
    _oracle(llm, {tuple(p): r[0] for p, r in zip(PROMPTS, plain)}, 0.7, seed=5)
    assert _tokens(llm.generate(PROMPTS[:3], params)) == plain
    assert llm.engine.stats["spec_accepted"] > 0 and _free(llm)


@pytest.mark.parametrize("scheme", ["int4:32", "int8"])
def test_greedy_mtp_on_a_quantized_model_with_a_draft_vocabulary(tiny_ckpt, scheme):
    """The draft head over the first ids of a quantized lm_head is quantized too; greedy output stays the
    quantized model's own plain output."""
    from deltarun.ops.quant import QuantLinear

    plain = _tokens(_llm(tiny_ckpt, mtp="off", quantization=scheme).generate(PROMPTS, BATCH_PARAMS))
    llm = _llm(tiny_ckpt, mtp="on", num_speculative_tokens=2, max_num_seqs=4, quantization=scheme,
               mtp_draft_vocab=320)
    head = llm.engine.spec.draft_head
    assert isinstance(head, QuantLinear) and head.out_features == 320 and head.bits == int(scheme[3])
    _oracle(llm, {tuple(p): r[0] for p, r in zip(PROMPTS, plain)}, 0.7, seed=3)
    assert _tokens(llm.generate(PROMPTS, BATCH_PARAMS)) == plain
    assert llm.engine.stats["spec_accepted"] > 0
    assert _free(llm)


def test_greedy_mtp_with_prefix_hits_stops_and_n(tiny_ckpt):
    system = _ids(70, seed=5)
    prompts = [system + _ids(n, seed=10 + n) for n in (4, 9, 30)]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    plain_llm = _llm(tiny_ckpt, mtp="off")
    plain = _tokens(plain_llm.generate(prompts, params))
    plain_lp = plain_llm.generate(prompts[1], params[1])[0].outputs[0].logprobs
    # a stop token that the plain run meets mid-way: never a token past it
    stop_tok = plain[2][0][7]
    stop = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_tok])
    want_stop = plain[2][0][: plain[2][0].index(stop_tok) + 1]
    llm = _llm(tiny_ckpt, mtp="on", num_speculative_tokens=3, prefix_cache_memory=GiB)
    _oracle(llm, {tuple(p): r[0] for p, r in zip(prompts, plain)}, 0.8)
    for _ in range(2):  # the second round resumes from the prefix cache
        assert _tokens(llm.generate(prompts, params)) == plain
        assert llm.generate(prompts[2], stop)[0].outputs[0].token_ids == want_stop
    lp = llm.generate(prompts[1], params[1])[0].outputs[0].logprobs
    assert [list(d) for d in lp] == [list(d) for d in plain_lp]
    for a, b in zip(lp, plain_lp):
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    assert llm.engine.stats["spec_accepted"] > 0 and _free(llm)


def test_state_after_partial_acceptance_equals_plain(tiny_ckpt):
    prompt = _ids(50, seed=3)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    ref = _llm(tiny_ckpt, mtp="off").generate(prompt, SamplingParams(temperature=0, max_tokens=60,
                                                                      ignore_eos=True))[0].outputs[0].token_ids
    spec, plain = _llm(tiny_ckpt, mtp="on", num_speculative_tokens=3), _llm(tiny_ckpt, mtp="off")
    _oracle(spec, {tuple(prompt): ref}, 0.7)
    for llm in (spec, plain):
        llm.engine.add_request("r", prompt, params.with_defaults({}))
    seq_s, seq_p = spec.engine.requests["r"].seqs[0], plain.engine.requests["r"].seqs[0]
    checked = 0
    while len(seq_s.token_ids) < 40:
        spec.engine.step()
        while len(seq_p.token_ids) < len(seq_s.token_ids):
            plain.engine.step()
        assert seq_s.token_ids == seq_p.token_ids
        if not seq_s.decoding:
            continue
        a, b = seq_s.state, seq_p.state
        assert a.length == b.length == seq_s.num_computed == seq_p.num_computed
        for x, y in zip(spec.engine.pool.snapshot(a.slot), plain.engine.pool.snapshot(b.slot)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
        for ca, cb in zip(a.kv, b.kv):
            assert ca.length == cb.length
            torch.testing.assert_close(ca.k[:, :, : ca.length], cb.k[:, :, : cb.length], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ca.v[:, :, : ca.length], cb.v[:, :, : cb.length], rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked > 5 and spec.engine.stats["spec_accepted"] > 0
    assert 0 < spec.engine.stats["steps"] < plain.engine.stats["steps"]


def test_rejection_step_keeps_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.0, 0.30])
    q = torch.tensor([0.40, 0.10, 0.10, 0.10, 0.20, 0.10])
    n, counts, accepted = 20000, torch.zeros(6), 0
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        tok, ok = rejection_step(p, q, d, g)
        counts[tok] += 1
        accepted += ok
    exp = p * n
    chi2 = float((((counts - exp) ** 2)[p > 0] / exp[p > 0]).sum())
    assert counts[4] == 0
    assert chi2 < 20.5  # 4 degrees of freedom: p ≈ 0.0004
    assert abs(accepted / n - float(torch.minimum(p, q).sum())) < 0.02  # acceptance = Σ min(p, q)


def test_sampled_requests_with_mtp_on(tiny_ckpt):
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=25, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, top_k=5, seed=7, max_tokens=9, ignore_eos=True, n=2),
              SamplingParams(temperature=1.2, min_p=0.05, presence_penalty=0.5, repetition_penalty=1.2,
                             max_tokens=14, min_tokens=3, ignore_eos=True)]
    llm = _llm(tiny_ckpt, mtp="on", num_speculative_tokens=2)
    a = llm.generate(PROMPTS[:3], params)
    b = _llm(tiny_ckpt, mtp="on", num_speculative_tokens=2).generate(PROMPTS[:3], params)
    assert _tokens(a)[:2] == _tokens(b)[:2]  # seeded: reproducible under mtp=on
    for out, p in zip(a, params):
        for o in out.outputs:
            assert len(o.token_ids) == p.max_tokens and o.finish_reason == "length"
    assert all(len(d) == 3 or len(d) == 2 for d in a[0].outputs[0].logprobs)
    assert llm.engine.stats["spec_drafted"] > 0 and _free(llm)


def test_abort_and_preemption_leave_no_slots(tiny_ckpt):
    llm = _llm(tiny_ckpt, mtp="on", num_speculative_tokens=3)
    e = llm.engine
    for i, p in enumerate(PROMPTS[:4]):
        e.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True).with_defaults({}))
    for _ in range(12):
        e.step()
    e.abort("1")
    e.scheduler.preempt(e.requests["3"])
    while e.has_unfinished():
        e.step()
    assert _free(llm) and e.stats["preemptions"] == 1
    # preemption under memory pressure, against the plain run
    kv, slot = e.kv_token_bytes, e.pool.slot_nbytes()
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = _tokens(_llm(tiny_ckpt, mtp="off").generate(PROMPTS[:3], params))
    tight = _llm(tiny_ckpt, mtp="on", max_memory=3 * slot + 330 * kv)
    assert _tokens(tight.generate(PROMPTS[:3], params)) == plain
    assert tight.engine.stats["preemptions"] > 0 and _free(tight)


def test_mtp_on_without_head_is_a_clear_error(tmp_path):
    ckpt = make_checkpoint(tmp_path / "nomtp", tiny_config(mtp_num_hidden_layers=0))
    assert load_mtp(ckpt) is None
    assert _llm(ckpt).engine.spec is None  # auto: silently off
    with pytest.raises(ValueError, match="no MTP head"):
        _llm(ckpt, mtp="on")
    with pytest.raises(ValueError, match="mtp must be"):
        _llm(ckpt, mtp="yes")


def test_mtp_head_loads_checkpoint_tensors_and_is_causal(tiny_ckpt):
    from safetensors import safe_open

    from deltarun.weights.loader import load_model, weight_files
    head, model = load_mtp(tiny_ckpt, "float32", "cpu"), load_model(tiny_ckpt, dtype="float32", device="cpu")
    params = dict(head.named_parameters())
    seen = 0
    for f in weight_files(tiny_ckpt):
        with safe_open(str(f), "pt") as st:
            for k in (k for k in st.keys() if k.startswith("mtp.")):
                torch.testing.assert_close(params[k[4:]], st.get_tensor(k))
                seen += 1
    assert seen == len(params)
    # whole sequence at once == pair by pair with the head's KV cache (what drafting does)
    ids, h = torch.randint(0, 1024, (1, 9)), torch.randn(1, 9, 64)
    pos = torch.arange(9)[None]
    whole = head(model, ids, h, pos, [KVCache()])
    cache = KVCache()
    steps = torch.cat([head(model, ids[:, i : i + 1], h[:, i : i + 1], pos[:, i : i + 1], [cache])
                       for i in range(9)], 1)
    torch.testing.assert_close(whole, steps, rtol=1e-4, atol=1e-4)
    # the embedding half comes first in fc's input (vLLM: cat([embeds, hidden]))
    e = head.pre_fc_norm_embedding(model.model.language_model.embed_tokens(ids[:, :1]))
    x = e @ head.fc.weight[:, :64].T + head.pre_fc_norm_hidden(h[:, :1]) @ head.fc.weight[:, 64:].T
    torch.testing.assert_close(head.fc(torch.cat([e, head.pre_fc_norm_hidden(h[:, :1])], -1)), x)


def test_distilled_head_accepts(tiny_ckpt, tmp_path):
    from deltarun.weights.loader import load_model
    model, head = load_model(tiny_ckpt, dtype="float32", device="cpu"), load_mtp(tiny_ckpt, "float32", "cpu")
    corpus = greedy_corpus(model, 4, 8, 32, seed=1)  # the head memorises these continuations
    losses = distill(model, head, corpus, steps=50, lr=1e-2, batch=4)
    assert losses[-1] < losses[0] - 1.0
    ckpt = write_with_head(tiny_ckpt, tmp_path / "distilled", head)
    prompts = [r[:8] for r in corpus.tolist()]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = _llm(ckpt, mtp="on", num_speculative_tokens=2)
    assert _tokens(llm.generate(prompts, params)) == _tokens(_llm(ckpt, mtp="off").generate(prompts, params))
    st = llm.engine.stats
    assert st["spec_accepted"] > 0.3 * st["spec_drafted"], st


@pytest.mark.parametrize("spec_cost,plain_cost", [(3.0, 1.0), (1.3, 1.0), (0.6, 1.0)])
def test_auto_policy_runs_the_cheaper_mode(spec_cost, plain_cost):
    policy, steps = SpecPolicy("auto"), 3000
    spec_steps, first = 0, []
    for _ in range(steps):
        spec = policy.speculate()
        spec_steps += spec
        first.append(spec)
        policy.record(spec, (spec_cost if spec else plain_cost) * 4, 4)  # 4 tokens per step
    if spec_cost > 1.5 * plain_cost:  # a clear loser is dropped after one measured step (plus the unmeasured one)
        assert sum(first[:40]) <= 2
    elif spec_cost > plain_cost:  # a modest loser after a whole probe (4 measured steps + the unmeasured one)
        assert sum(first[:40]) <= 5
    cheaper = spec_cost < plain_cost
    share = spec_steps / steps if not cheaper else 1 - spec_steps / steps  # time in the losing mode
    assert share < 0.02
    assert SpecPolicy("on").speculate() and not SpecPolicy("off").speculate()


def test_cli_flags_and_metrics_reach_the_engine(tiny_ckpt):
    from deltarun.async_llm import engine_stats
    from deltarun.cli import build_parser, engine_options
    from deltarun.server.metrics import Metrics

    args = build_parser().parse_args(["generate", str(tiny_ckpt), "hi", "--mtp", "on", "--num-speculative-tokens", "3",
                                      "--mtp-draft-vocab", "300"])
    opts = engine_options(args)
    assert (opts["mtp"], opts["num_speculative_tokens"], opts["mtp_draft_vocab"]) == ("on", 3, 300)
    assert build_parser().parse_args(["generate", "demo", "hi"]).mtp == "auto"
    llm = _llm(tiny_ckpt, mtp=opts["mtp"], num_speculative_tokens=opts["num_speculative_tokens"],
               mtp_draft_vocab=opts["mtp_draft_vocab"])
    assert llm.engine.spec.k == 3 and llm.engine.spec.draft_head.out_features == 300
    llm.generate(PROMPTS[0], GREEDY)
    text = Metrics().render({"tiny": engine_stats(llm.engine)})
    drafted = llm.engine.stats["spec_drafted"]
    assert drafted > 0 and f'deltarun_spec_decode_draft_tokens_total{{model="tiny"}} {drafted}' in text


def test_plain_steps_do_not_hold_the_verify_scratch(tiny_ckpt):
    """Once auto decodes plainly, the verify scratch is freed (the soak saw ~0.5 GB of the 0.8B's held for
    good after one probe at a full batch); a later speculative step allocates it again and still matches."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = _tokens(_llm(tiny_ckpt, mtp="off").generate(PROMPTS[:4], params))
    llm = _llm(tiny_ckpt, mtp="auto", num_speculative_tokens=2)
    policy, pool = llm.engine.spec.policy, llm.engine.pool
    modes = iter([True] * 3 + [False] * 3 + [True] * 100)
    seen = []

    def speculate():
        seen.append((mode := next(modes), bool(pool._verify)))
        return mode
    policy.speculate = speculate
    assert _tokens(llm.generate(PROMPTS[:4], params)) == plain
    # (mode of the step, scratch held when it began): held after speculative steps, freed by the first plain one
    assert seen[1:4] == [(True, True), (True, True), (False, True)] and seen[4:6] == [(False, False)] * 2
    assert seen[6] == (True, False) and seen[7] == (True, True) and _free(llm)


def test_auto_policy_compares_steps_of_the_same_batch_size():
    """A server's batch swings between a few rows and many. Plain steps cost far less per token at 16 rows
    than at 2; a speculative step whose drafts are never accepted costs 2× the plain step of its own size.
    Auto must keep to plain whatever sizes its probes happen to meet: under 1% of the time speculating
    (per-token seconds alone made probes at 16 rows look cheaper than plain measured at 2: ~3% here)."""
    def plain(rows: int) -> float:
        return 0.04 + 0.007 * rows  # 2 rows: 27 ms a token; 16 rows: 9.5 ms

    for pattern in (lambda i: 2 if (i // 7) % 2 else 16, lambda i: 16 if i % 50 < 40 else 3):
        policy, spent, total = SpecPolicy("auto"), 0.0, 0.0
        for i in range(6000):
            rows = pattern(i)
            spec = policy.speculate()
            seconds = 2 * plain(rows) if spec else plain(rows)
            spent, total = spent + (seconds if spec else 0.0), total + seconds
            policy.record(spec, seconds, rows, rows)
        assert spent / total < 0.01, spent / total
