"""Reasoning/answer split: known cases, and streaming in random pieces equals the one-shot split."""

from __future__ import annotations

import random

import pytest

from deltarun.outputs import StreamDelta
from deltarun.processor.reasoning import DeltaSplitter, ReasoningParser, opens_think, skip_reasoning, split_reasoning


def _stream(text: str, in_think: bool, cuts: list[int]) -> tuple[str, str]:
    parser = ReasoningParser(in_think)
    reasoning, content, pos = [], [], 0
    for cut in cuts + [len(text)]:
        r, c = parser.feed(text[pos:cut])
        reasoning.append(r)
        content.append(c)
        pos = cut
    r, c = parser.finish()
    return "".join(reasoning) + r, "".join(content) + c


CASES = [
    # (text, in_think, reasoning, content)
    ("Let me think.\nStep 2.\n</think>\n\nThe answer is 4.", True, "Let me think.\nStep 2.", "The answer is 4."),
    ("\n</think>\n\nHi", True, "", "Hi"),
    ("plain answer", False, "", "plain answer"),
    ("\n\nplain answer\n", False, "", "\n\nplain answer\n"),
    ("<think>\nself-opened\n</think>\n\nanswer", False, "self-opened", "answer"),
    ("  \n<think>\nr\n</think>\n\nanswer", False, "r", "answer"),
    ("<think>\nr\n</think>\n\na", True, "r", "a"),  # a repeated opening tag is not reasoning text
    ("still thinking when cut off\n", True, "still thinking when cut off", ""),
    ("a</think>b</think>c", True, "a", "b</think>c"),
    ("text with <think> inside", False, "", "text with <think> inside"),
    ("r\n\n\n</think>\n\n\n\nanswer\n\n", True, "r", "answer\n\n"),
    ("r </thin", True, "r </thin", ""),
    ("<thin", False, "", "<thin"),
    ("", True, "", ""),
    ("", False, "", ""),
    ("   ", False, "", "   "),
    ("\n\n", True, "", ""),
]


@pytest.mark.parametrize("text, in_think, reasoning, content", CASES)
def test_known_cases(text, in_think, reasoning, content):
    assert split_reasoning(text, in_think) == (reasoning, content)
    assert _stream(text, in_think, []) == (reasoning, content)
    for cut in range(len(text) + 1):
        assert _stream(text, in_think, [cut]) == (reasoning, content), cut
    assert _stream(text, in_think, list(range(1, len(text)))) == (reasoning, content)


def test_streaming_deltas_arrive_early():
    parser = ReasoningParser(in_think=True)
    assert parser.feed("Thinking about it") == ("Thinking about it", "")
    assert parser.feed("\n") == ("", "")  # may be the newline before </think>
    assert parser.feed("</th") == ("", "")
    assert parser.feed("ink>\n") == ("", "")
    assert parser.feed("\nAnswer") == ("", "Answer")
    assert parser.feed(" more") == ("", " more")
    assert parser.finish() == ("", "")
    assert parser.saw_close


def test_newline_inside_reasoning_is_kept():
    parser = ReasoningParser(in_think=True)
    assert parser.feed("a\n") == ("a", "")
    assert parser.feed("b") == ("\nb", "")


def _random_text(rng: random.Random) -> str:
    pieces = ["<think>", "</think>", "<thi", "</th", "\n", "\n\n", " ", "abc", "思考", "😀", "<", ">", "/", "think",
              "x"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))


@pytest.mark.parametrize("in_think", [True, False])
def test_random_streaming_equals_split(in_think):
    rng = random.Random(11 + in_think)
    for _ in range(3000):
        text = _random_text(rng)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        assert _stream(text, in_think, cuts) == split_reasoning(text, in_think), (text, cuts)


def test_model_output_format_roundtrip():
    reasoning, answer = "Need weather.\n\nThen answer.", "<tool_call>\n<function=f>\n</function>\n</tool_call>"
    generated = f"{reasoning}\n</think>\n\n{answer}"
    assert split_reasoning(generated, in_think=True) == (reasoning, answer)


def test_prompt_helpers():
    thinking, plain = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n"
    assert opens_think(thinking) and not opens_think(plain)
    assert skip_reasoning(thinking) == thinking + "\n</think>\n\n" and not opens_think(skip_reasoning(thinking))
    assert skip_reasoning(plain) == plain


def test_final_feed_equals_feed_then_finish():
    rng = random.Random(5)
    for _ in range(500):
        text = _random_text(rng)
        cut = rng.randint(0, len(text))
        parser = ReasoningParser(True)
        r1, c1 = parser.feed(text[:cut])
        r2, c2 = parser.feed(text[cut:], final=True)
        assert (r1 + r2, c1 + c2) == split_reasoning(text, True), (text, cut)


def test_delta_splitter_keeps_one_parser_per_sequence():
    texts = ["plan\n</think>\n\nanswer one", "<think>x</think>two"]
    split = DeltaSplitter("<think>\n")
    got = {0: ["", ""], 1: ["", ""]}
    pieces = [(i, t[k:k + 3]) for k in range(0, 30, 3) for i, t in enumerate(texts) if k < len(t)]
    ends = {i: max(k for k, (j, _) in enumerate(pieces) if j == i) for i in got}
    for k, (i, piece) in enumerate(pieces):
        d = split(StreamDelta(i, piece, [], "stop" if ends[i] == k else None))
        got[i][0] += d.reasoning
        got[i][1] += d.content
    assert [tuple(got[i]) for i in got] == [split_reasoning(t, True) for t in texts]


def test_thinking_budget_mask_counts_only_reasoning():
    import torch

    from deltarun.processor.reasoning import ThinkingBudget

    OPEN_ID, CLOSE_ID = 7, 9
    mask = ThinkingBudget(3, OPEN_ID, CLOSE_ID, in_think=True)()
    for tok in (1, 2):
        logits = torch.zeros(12)
        mask(logits)
        assert torch.isfinite(logits).all()  # under budget: free
        mask.accept(tok)
    mask.accept(3)
    logits = torch.zeros(12)
    mask(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [CLOSE_ID]  # spent: only </think>
    mask.accept(CLOSE_ID)
    logits = torch.zeros(12)
    mask(logits)
    assert torch.isfinite(logits).all()  # the answer is free
    quiet = ThinkingBudget(0, OPEN_ID, CLOSE_ID, in_think=False)()  # no block open: nothing to bound
    quiet.accept(1)
    logits = torch.zeros(12)
    quiet(logits)
    assert torch.isfinite(logits).all()
    opened = ThinkingBudget(0, OPEN_ID, CLOSE_ID, in_think=False)()  # the model opens one itself
    opened.accept(OPEN_ID)
    logits = torch.zeros(12)
    opened(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [CLOSE_ID]
    with pytest.raises(ValueError):
        ThinkingBudget(-1, OPEN_ID, CLOSE_ID, True)


@pytest.mark.parametrize("budget", [0, 5])
def test_thinking_budget_on_chat_completions(chat_ckpt, budget):
    """`thinking_budget`: the reasoning holds at most that many tokens, then `</think>` and an answer follow
    (the random model never closes its reasoning by itself)."""
    import httpx
    from server_helpers import live_server

    live = live_server(chat_ckpt)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": budget + 12,
            "ignore_eos": True, "enable_thinking": True, "thinking_budget": budget, "logprobs": True,
            "temperature": 0}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    tokens = [t["token"] for t in choice["logprobs"]["content"]]
    assert tokens.index("</think>") <= budget
    assert choice["message"]["content"]  # the answer followed
    unbounded = httpx.post(live.url + "/v1/chat/completions", json={**body, "thinking_budget": None}, timeout=120)
    assert "</think>" not in [t["token"] for t in unbounded.json()["choices"][0]["logprobs"]["content"]]
    bad = httpx.post(live.url + "/v1/chat/completions", json={**body, "thinking_budget": -1}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "thinking_budget"
