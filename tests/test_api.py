"""The Python API end to end on a tiny model with the real tokenizer and chat template."""
import pytest

from deltarun import SamplingParams
from deltarun.processor.chat_template import ChatTemplate

MSGS = [{"role": "user", "content": "Hello there"}]


def test_chat_renders_official_template_and_splits_reasoning(chat_llm, chat_ckpt):
    out = chat_llm.chat(MSGS, SamplingParams(temperature=0, max_tokens=8), enable_thinking=True)
    expected = ChatTemplate.from_folder(chat_ckpt).render(MSGS, add_generation_prompt=True, enable_thinking=True)
    assert out.prompt == expected and out.prompt.endswith("<think>\n")
    assert out.prompt_token_ids == chat_llm.tokenizer.encode(expected)
    c = out.outputs[0]
    # with thinking on and no </think> produced, everything generated is reasoning
    if "</think>" not in c.text:
        assert c.content == "" and c.reasoning == c.text.strip("\n")
    off = chat_llm.chat(MSGS, SamplingParams(temperature=0, max_tokens=8), enable_thinking=False)
    assert off.prompt.endswith("<think>\n\n</think>\n\n")
    assert off.outputs[0].reasoning == "" and off.outputs[0].content == off.outputs[0].text.strip()


def test_small_model_defaults_to_no_thinking(chat_llm):
    assert chat_llm.template.thinking_default is False
    out = chat_llm.chat(MSGS, SamplingParams(max_tokens=2))
    assert out.prompt.endswith("<think>\n\n</think>\n\n")


def test_chat_stream_equals_chat(chat_llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    whole = chat_llm.chat(MSGS, params, enable_thinking=True).outputs[0]
    deltas = list(chat_llm.chat_stream(MSGS, params, enable_thinking=True))
    assert "".join(d.text for d in deltas) == whole.text
    assert "".join(d.reasoning for d in deltas) == whole.reasoning
    assert "".join(d.content for d in deltas) == whole.content
    assert deltas[-1].finish_reason == "length"


def test_text_equals_decode_and_seed_reproducible(chat_llm):
    params = SamplingParams(temperature=1.0, top_k=0, seed=123, max_tokens=30, ignore_eos=True)
    a = chat_llm.generate("Once upon a time", params)[0].outputs[0]
    b = chat_llm.generate("Once upon a time", params)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.text == chat_llm.tokenizer.decode(a.token_ids, skip_special_tokens=True)
    c = chat_llm.generate("Once upon a time", SamplingParams(temperature=1.0, top_k=0, seed=124, max_tokens=30,
                                                             ignore_eos=True))[0].outputs[0]
    assert c.token_ids != a.token_ids


def test_stop_strings_cut_text_and_end_request(chat_llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = chat_llm.generate("abc", params)[0].outputs[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = chat_llm.generate("abc", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    o = cut.outputs[0]
    assert o.text == text[: text.find(stop)] and o.finish_reason == "stop" and o.stop_reason == stop
    assert len(o.token_ids) < len(full.token_ids)
    inc = chat_llm.generate("abc", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == text[: text.find(stop)] + stop


def test_stop_token_ids_and_logprobs(chat_llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    o = chat_llm.generate("xyz", params)[0].outputs[0]
    assert len(o.logprobs) == len(o.token_ids) == 10
    for tok, d in zip(o.token_ids, o.logprobs):
        assert next(iter(d)) == tok and len(d) in (3, 4)
        ranked = sorted((lp.rank, lp.logprob) for lp in d.values() if lp.rank)
        assert [r for r, _ in ranked] == [1, 2, 3]
        assert d[tok].rank == 1  # greedy picks the top token
    assert abs(o.cumulative_logprob - sum(d[t].logprob for t, d in zip(o.token_ids, o.logprobs))) < 1e-4
    stopper = o.token_ids[4]
    s = chat_llm.generate("xyz", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                stop_token_ids=[stopper]))[0].outputs[0]
    k = o.token_ids.index(stopper)
    assert s.token_ids == o.token_ids[: k + 1] and s.finish_reason == "stop" and s.stop_reason == stopper


def test_batch_of_prompts_and_max_tokens_zero(chat_llm):
    outs = chat_llm.generate(["one", [1, 2, 3], "three"], SamplingParams(temperature=0, max_tokens=3))
    assert [o.prompt for o in outs] == ["one", None, "three"]
    assert outs[1].prompt_token_ids == [1, 2, 3]
    zero = chat_llm.generate("hello world", SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert zero.outputs[0].token_ids == [] and zero.outputs[0].finish_reason == "length"
    assert zero.prompt_logprobs[0] is None and len(zero.prompt_logprobs) == len(zero.prompt_token_ids)


def test_bad_requests_raise_clear_errors(chat_llm):
    with pytest.raises(ValueError, match="empty"):
        chat_llm.generate([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chat_llm.generate([[10**7]])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="context length"):
        chat_llm.generate([[5] * (chat_llm.engine.max_model_len + 1)])
    with pytest.raises(ValueError, match="No user query"):
        chat_llm.chat([{"role": "system", "content": "only a system prompt"}])
    assert not chat_llm.engine.has_unfinished()


def test_context_end_finishes_with_length(chat_ckpt):
    from deltarun import LLM

    llm = LLM(str(chat_ckpt), dtype="float32", device="cpu", max_model_len=20)
    o = llm.generate([1] * 15, SamplingParams(temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(o.token_ids) == 5 and o.finish_reason == "length"


def test_closing_a_stream_aborts(chat_llm):
    stream = chat_llm.generate_stream("abc", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not chat_llm.engine.has_unfinished()


def test_the_random_demo_answers_are_bounded(chat_ckpt, chat_llm, tmp_path, monkeypatch):
    """The demo (random weights) never emits end-of-turn: by default an answer stops at 256 tokens, unless
    the request asks for more; a real model's default is the model card's 32,768 (within the context)."""
    from deltarun import LLM
    from deltarun.llm import DEFAULT_MAX_TOKENS, DEMO_MAX_TOKENS
    from deltarun.paths import cache_dir

    monkeypatch.setenv("DELTARUN_HOME", str(tmp_path))
    demo = cache_dir() / "demo-qwen3.5-0.8b-random"
    demo.symlink_to(chat_ckpt)  # stands in for the 0.8B-layout demo checkpoint
    llm = LLM(str(demo), dtype="float32", device="cpu")
    room = llm.engine.max_model_len - 1
    assert DEMO_MAX_TOKENS == 256 and llm.prepare([5], None).params.max_tokens == min(256, room)
    assert llm.prepare([5], SamplingParams(max_tokens=300)).params.max_tokens == 300
    assert chat_llm.prepare([5], None).params.max_tokens == min(DEFAULT_MAX_TOKENS, room)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == min(256, llm.engine.max_model_len - 3) and out.finish_reason == "length"
