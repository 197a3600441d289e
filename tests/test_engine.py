"""Continuous batching, prefix reuse and preemption: every way of scheduling gives the same tokens.

References: the same request run alone on a fresh engine (cold, unbatched, no prefix cache).
"""
import pytest
import torch

from deltarun import LLM, SamplingParams

GiB = 1 << 30


def _ids(n, seed):
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(ckpt, **kw):
    kw.setdefault("prefix_cache_memory", 0)
    kw.setdefault("max_memory", GiB)
    return LLM(str(ckpt), dtype="float32", device="cpu", **kw)


def _alone(ckpt, prompt, params):
    out = _llm(ckpt).generate(prompt, params)[0]
    return [o.token_ids for o in out.outputs], [o.logprobs for o in out.outputs]


def _free(llm):
    return len(llm.engine.pool.free_slots) == llm.engine.pool.num_slots and not llm.engine.active


PARAMS = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
          SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=25, ignore_eos=True),
          SamplingParams(temperature=1.0, top_k=5, seed=7, max_tokens=9, ignore_eos=True, n=2),
          SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=30, ignore_eos=True),
          SamplingParams(temperature=1.2, min_p=0.05, seed=3, presence_penalty=0.5, max_tokens=14,
                         ignore_eos=True)]
PROMPTS = [_ids(n, seed=n) for n in (3, 70, 129, 20, 200)]


def test_batched_equals_unbatched(tiny_ckpt):
    llm = _llm(tiny_ckpt, max_prefill_tokens=64)
    outs = llm.generate(PROMPTS, PARAMS)
    for prompt, params, out in zip(PROMPTS, PARAMS, outs):
        alone, _ = _alone(tiny_ckpt, prompt, params)
        assert [o.token_ids for o in out.outputs] == alone
    assert _free(llm)


def test_slots_limit_makes_requests_wait(tiny_ckpt):
    llm = _llm(tiny_ckpt, max_num_seqs=2)
    outs = llm.generate(PROMPTS[:4], [PARAMS[0], PARAMS[1], PARAMS[0], PARAMS[3]])
    for prompt, params, out in zip(PROMPTS[:4], [PARAMS[0], PARAMS[1], PARAMS[0], PARAMS[3]], outs):
        assert [o.token_ids for o in out.outputs] == _alone(tiny_ckpt, prompt, params)[0]
    assert _free(llm)


def test_preemption_recomputes_exactly(tiny_ckpt):
    kv_token = _llm(tiny_ckpt).engine.kv_token_bytes
    slot = _llm(tiny_ckpt).engine.pool.slot_nbytes()
    # room for about two sequences' state: the others are preempted and recomputed as KV grows
    llm = _llm(tiny_ckpt, max_memory=2 * slot + 400 * kv_token, max_prefill_tokens=64)
    params = [SamplingParams(temperature=0, max_tokens=120, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=120, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)]
    prompts = PROMPTS[1:4]
    outs = llm.generate(prompts, params)
    assert llm.engine.stats["preemptions"] > 0
    for prompt, p, out in zip(prompts, params, outs):
        assert [o.token_ids for o in out.outputs] == _alone(tiny_ckpt, prompt, p)[0]
    assert _free(llm)


@pytest.mark.parametrize("case", ["second_turn", "shared_system", "prefix_of_cached", "diverge_mid_chunk"])
def test_prefix_hit_equals_cold(tiny_ckpt, case):
    base = _ids(300, seed=11)
    first, second = {
        "second_turn": (base[:200], base[:200] + _ids(60, seed=12)),
        "shared_system": (base[:130] + _ids(40, seed=13), base[:130] + _ids(55, seed=14)),
        "prefix_of_cached": (base, base[:150]),
        "diverge_mid_chunk": (base, base[:100] + [(base[100] + 1) % 1024] + base[101:170]),
    }[case]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    llm = _llm(tiny_ckpt, prefix_cache_memory=GiB, max_prefill_tokens=96)
    llm.generate(first, params)
    before = llm.engine.prefix.hit_tokens
    warm = llm.generate(second, params)[0].outputs[0]
    assert llm.engine.prefix.hit_tokens > before  # the second request did reuse a prefix
    cold_tokens, cold_lps = _alone(tiny_ckpt, second, params)
    assert warm.token_ids == cold_tokens[0]
    warm_lp = [d[t].logprob for d, t in zip(warm.logprobs, warm.token_ids)]
    cold_lp = [d[t].logprob for d, t in zip(cold_lps[0], cold_tokens[0])]
    assert max(abs(a - b) for a, b in zip(warm_lp, cold_lp)) < 1e-4
    assert _free(llm)


def test_abort_releases_state(tiny_ckpt):
    llm = _llm(tiny_ckpt)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, n=3).with_defaults({})
    eng.add_request("a", PROMPTS[2], params)
    eng.add_request("b", PROMPTS[4], params)
    for _ in range(4):
        eng.step()
    assert eng.active
    eng.abort("a")
    eng.abort("b")
    assert _free(llm) and not eng.queue and not eng.has_unfinished()


def test_short_prompt_is_not_held_behind_a_long_prefill(tiny_ckpt):
    """Waiting prompts take turns chunk by chunk: a short prompt arriving while a long one prefills gets its
    first token after at most one more chunk of the long one, and both answers equal their runs alone."""
    llm = _llm(tiny_ckpt, max_prefill_tokens=32, prefix_cache_memory=GiB)
    eng = llm.engine
    long_prompt, short_prompt = _ids(600, seed=21), _ids(12, seed=22)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True).with_defaults({})
    eng.add_request("long", long_prompt, params)
    for _ in range(3):
        eng.step()
    eng.add_request("short", short_prompt, params)
    tokens: dict[str, list[int]] = {"long": [], "short": []}
    steps_to_first = None
    for step in range(1, 200):
        for out in eng.step():
            for u in out.updates:
                tokens[out.request_id] += u.new_token_ids
        if steps_to_first is None and tokens["short"]:
            steps_to_first = step
        if not eng.has_unfinished():
            break
    assert steps_to_first is not None and steps_to_first <= 2  # FCFS would wait ~17 chunks of the long prompt
    assert tokens["long"] == _alone(tiny_ckpt, long_prompt, params)[0][0]
    assert tokens["short"] == _alone(tiny_ckpt, short_prompt, params)[0][0]
    assert _free(llm)


def test_admission_stays_in_arrival_order(tiny_ckpt):
    """With one slot, a waiting prompt is not overtaken by later arrivals, whatever their length."""
    llm = _llm(tiny_ckpt, max_num_seqs=1, max_prefill_tokens=32)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True).with_defaults({})
    for name, n in (("a", 90), ("b", 200), ("c", 5)):
        eng.add_request(name, _ids(n, seed=n), params)
    finished = []
    for _ in range(300):
        finished += [o.request_id for o in eng.step() if o.finished]
        if not eng.has_unfinished():
            break
    assert finished == ["a", "b", "c"]


def test_waiting_prompts_prefill_together(tiny_ckpt):
    """Short prompts that arrive together share one forward per step (up to max_prefill_tokens), and each
    gives what it gives alone."""
    llm = _llm(tiny_ckpt, max_prefill_tokens=64)
    eng = llm.engine
    prompts = [_ids(n, seed=100 + n) for n in (20, 9, 30, 15)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True).with_defaults({})
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    first = eng.step()  # 20 + 9 + 30 tokens whole, then 5 of the last prompt: one forward
    assert eng.stats["forwards"] == 1 and eng.stats["prompt_tokens"] == 64
    assert sorted(o.request_id for o in first) == ["r0", "r1", "r2"]
    tokens: dict[str, list[int]] = {}
    outs = first
    while True:
        for o in outs:
            for u in o.updates:
                tokens.setdefault(o.request_id, []).extend(u.new_token_ids)
        if not eng.has_unfinished():
            break
        outs = eng.step()
    for i, p in enumerate(prompts):
        assert tokens[f"r{i}"] == _alone(tiny_ckpt, p, params)[0][0]
    assert _free(llm)
