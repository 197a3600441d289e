"""OpenAI API end to end: the official `openai` client (and raw HTTP for wire details) against a live
server with a tiny random checkpoint. Random weights write noise, so tool calls run on scripted output."""
import json

import httpx
import openai
import pytest
from server_helpers import live_server, scripted, wait_idle

MSG = [{"role": "user", "content": "Hello there"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def live(chat_ckpt):
    return live_server(chat_ckpt)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(model="tiny", messages=kw.pop("messages", MSG), **kw)


def test_models(client):
    assert [m.id for m in client.models.list().data][0] == "tiny"  # loaded first, then the other local models
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_usage_and_stream_matches(client, live):
    r = _chat(client, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    ids = live.llm.render(MSG, None)[1]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == len(ids) + 6
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    chunks = list(_chat(client, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sse_framing(live):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ") and json.loads(e[6:])["object"] == "chat.completion.chunk"


def test_seed_n_and_stop(client):
    a = _chat(client, max_tokens=8, temperature=1.0, seed=7, n=2)
    b = _chat(client, max_tokens=8, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    full = _chat(client, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = _chat(client, max_tokens=8, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(stop)]


def test_logprobs(client):
    r = _chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    lps = r.choices[0].logprobs.content
    assert len(lps) == 4
    for e in lps:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy picks the top token


def test_thinking_switches(client):
    on = _chat(client, max_tokens=5, temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    off = _chat(client, max_tokens=5, temperature=0, reasoning_effort="none")
    assert on.usage.prompt_tokens == off.usage.prompt_tokens - 2  # "<think>\n" vs "<think>\n\n</think>\n\n"
    assert off.choices[0].message.content and not getattr(off.choices[0].message, "reasoning_content", None)
    msg = on.choices[0].message
    if "</think>" not in (msg.content or ""):  # noise rarely closes the block
        assert msg.reasoning_content and not msg.content


def test_completions_echo_logprobs_match_generation(client, live):
    ids = live.llm.tokenizer.encode("The capital of France is")
    g = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1)
    tok_lp = g.choices[0].logprobs.token_logprobs[0]
    nxt = live.llm.tokenizer.encode(g.choices[0].text)
    assert len(nxt) == 1  # the one generated token, re-encoded
    e = client.completions.create(model="tiny", prompt=ids + nxt, max_tokens=0, echo=True, logprobs=2)
    lp = e.choices[0].logprobs
    assert e.choices[0].text == live.llm.tokenizer.decode(ids + nxt) and e.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) + 1 and e.choices[0].finish_reason == "length"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[-1] == pytest.approx(tok_lp, abs=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])


def test_completions_token_ids_and_batch(client):
    r = client.completions.create(model="tiny", prompt=[[1, 2, 3], [4, 5]], max_tokens=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == 5
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0, stream=True))
    s = client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == s.choices[0].text


@pytest.mark.parametrize("fmt", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "w", "schema": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "n": {"type": "integer"},
                                         "ok": {"type": "boolean"}},
        "required": ["city", "n", "ok"], "additionalProperties": False}}},
])
def test_structured_output_always_parses(client, fmt):
    for seed in range(3):
        r = _chat(client, max_tokens=60, temperature=1.0, seed=seed, response_format=fmt)
        content = r.choices[0].message.content
        if fmt["type"] == "json_object" and r.choices[0].finish_reason == "length":
            assert content.startswith("{")  # free-form noise may fill max_tokens before closing
            continue
        obj = json.loads(content)
        assert isinstance(obj, dict) and r.choices[0].finish_reason == "stop"
        if fmt["type"] == "json_schema":
            assert set(obj) == {"city", "n", "ok"} and isinstance(obj["n"], int) and isinstance(obj["ok"], bool)


def test_errors_are_openai_shaped_and_server_survives(client, live):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    for kw in [dict(messages=[]), dict(messages=[{"role": "wizard", "content": "x"}]), dict(temperature=-1),
               dict(max_tokens=10**7), dict(n="two"), dict(response_format={"type": "json_schema",
                                                                             "json_schema": {"name": "x"}}),
               dict(tool_choice={"type": "function", "function": {"name": "missing"}}, tools=TOOLS),
               dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])]:
        with pytest.raises(openai.BadRequestError) as info:
            _chat(client, **{"max_tokens": 2, **kw})
        err = info.value.body
        assert isinstance(err, dict) and err["message"] and err["type"] == "invalid_request_error", kw
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    small = live_server(live.llm.path, max_body_bytes=1000)
    r = httpx.post(small.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG * 100}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body larger")
    assert _chat(client, max_tokens=1).choices[0].message is not None


def test_api_key(chat_ckpt):
    live = live_server(chat_ckpt, api_key="s3cret")
    assert httpx.get(live.url + "/v1/models").status_code == 401
    assert httpx.get(live.url + "/api/tags").json() == {"error": "missing or wrong API key "
                                                                  "(Authorization: Bearer ... or x-api-key)"}
    assert httpx.get(live.url + "/api/tags", headers={"x-api-key": "s3cret"}).status_code == 200  # Anthropic's
    assert httpx.get(live.url + "/api/tags", headers={"x-api-key": "s3cre"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
    assert ok.models.list().data[0].id == "tiny"


@pytest.mark.parametrize("extreme", [{"repetition_penalty": 5e-324},
                                     {"temperature": 1e300, "min_tokens": 2, "ignore_eos": False},
                                     {"repetition_penalty": 1e-300, "response_format": {"type": "json_object"}}])
def test_extreme_sampling_values_still_sample(live, extreme):
    """Found by the fuzz (test_server_fuzz.py): a repetition penalty near 0 or a temperature past fp32's
    range (all valid; min_tokens and a grammar put -inf on tokens, and -inf / inf or -inf * 0 is NaN) made
    the softmax NaN and the request a 500."""
    body = {"model": "tiny", "prompt": [105, 811, 461, 45, 390, 437, 61, 0], "max_tokens": 2, "seed": 1,
            "temperature": 0.5, "ignore_eos": True, **extreme}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_client_disconnect_aborts(live):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        for _ in range(4):
            next(it)
        assert live.llm.engine.has_unfinished()
    assert wait_idle(live.llm)  # the engine dropped the request well before 3000 tokens


def test_tool_calls_parsed_and_streamed(client, monkeypatch):
    pieces = ["I'll check", ".\n\n<tool", "_call>\n<function=get_weather>\n<parameter=city>\nPar", "is\n</param",
              "eter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_",
              "weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"]
    scripted(monkeypatch, pieces)
    r = _chat(client, tools=TOOLS, max_tokens=50)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "I'll check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Rome"})]
    chunks = list(_chat(client, tools=TOOLS, max_tokens=50, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "I'll check." and "<tool_call>" not in content
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather"), (1, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    one = _chat(client, tools=TOOLS, max_tokens=50, parallel_tool_calls=False).choices[0].message
    assert len(one.tool_calls) == 1


def test_tool_history_and_named_choice(client, live):
    history = MSG + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}]
    r = _chat(client, messages=history, tools=TOOLS, max_tokens=2, tool_choice="none")
    assert r.choices[0].finish_reason in ("length", "stop")
    named = _chat(client, tools=TOOLS, max_tokens=2, tool_choice={"type": "function",
                                                                  "function": {"name": "get_weather"}})
    plain = _chat(client, tools=TOOLS, max_tokens=2)
    forced = live.llm.tokenizer.encode("<tool_call>\n<function=get_weather>\n")
    assert named.usage.prompt_tokens == plain.usage.prompt_tokens + len(forced)


def test_cli_serve_rejects_bad_port(capsys):
    from deltarun.cli import main

    assert main(["serve", "demo", "--port", "0"]) == 1
    assert "--port must be in 1..65535" in capsys.readouterr().err


STRICT_TOOLS = TOOLS + [{"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "required": ["city", "nights", "room"],
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "nights": {"type": "integer", "minimum": 1, "maximum": 9},
                   "room": {"enum": ["single", "double"]},
                   "extras": {"type": "array", "items": {"type": "boolean"}}}}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "book"}}])
def test_forced_tool_call_follows_schema(client, choice):
    """Random weights + the tool-call grammar still give a parseable call whose arguments fit the schema."""
    for seed in range(3):
        msg = _chat(client, tools=STRICT_TOOLS, tool_choice=choice, max_tokens=300, seed=seed,
                    temperature=1.0).choices[0]
        assert msg.finish_reason == "tool_calls" and len(msg.message.tool_calls) == 1
        call = msg.message.tool_calls[0].function
        args = json.loads(call.arguments)
        if call.name == "get_weather":
            assert set(args) <= {"city", "days"} and all(
                isinstance(v, str if k == "city" else int) for k, v in args.items())
            continue
        assert call.name == "book" and set(args) - {"extras"} == {"city", "nights", "room"}
        assert isinstance(args["city"], str) and 0 < len(args["city"]) <= 20
        assert type(args["nights"]) is int and 1 <= args["nights"] <= 9 and args["room"] in ("single", "double")
        assert all(type(x) is bool for x in args.get("extras", []))


def test_usage_counts_prompt_tokens_from_the_prefix_cache(chat_ckpt):
    """usage.prompt_tokens_details.cached_tokens: 0 for a new prompt; for a repeat, the prompt tokens the prefix
    cache restored (whole 64-token blocks, the last prompt token always computed)."""
    import uuid

    import httpx
    from server_helpers import live_server

    live = live_server(chat_ckpt)
    text = f"{uuid.uuid4().hex} " + "a long shared question about deltas " * 20
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 2}
    first = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120).json()["usage"]
    second = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120).json()["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] > 128
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == (second["prompt_tokens"] - 1) // 64 * 64
