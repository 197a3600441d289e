"""Anthropic Messages API end to end: the official `anthropic` client (raw HTTP for the wire format) against a
live server with a tiny random checkpoint. Random weights write noise, so tool calls and thinking that ends
run on scripted output (server_helpers.scripted)."""
import base64
import io
import json

import anthropic
import httpx
import numpy as np
import pytest
from server_helpers import live_server, scripted

MSG = [{"role": "user", "content": "Hello there"}]
OFF = {"type": "disabled"}
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                             "days": {"type": "integer", "minimum": 1, "maximum": 9}},
                           "required": ["city"]}}]
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"


@pytest.fixture(scope="module")
def live(chat_ckpt):
    return live_server(chat_ckpt)


@pytest.fixture(scope="module")
def client(live):
    return anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0)


def _create(client, **kw):
    """messages.create; sampling knobs go in extra_body (the current SDK no longer types them)."""
    extra = {k: kw.pop(k) for k in ("temperature", "top_p", "top_k") if k in kw}
    if extra:
        kw["extra_body"] = extra
    kw.setdefault("messages", MSG)
    kw.setdefault("max_tokens", 8)
    return client.messages.create(model="tiny", **kw)


def _ids(live, messages, thinking=False, tools=None) -> list[int]:
    return live.llm.render(messages, thinking, tools)[1]


def test_text_matches_chat_completions(client, live):
    r = _create(client, thinking=OFF, temperature=0)
    oa = httpx.post(live.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": MSG, "max_tokens": 8, "temperature": 0, "enable_thinking": False}).json()
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_") and r.model == "tiny"
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == oa["choices"][0]["message"]["content"]
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None and r.usage.output_tokens == 8
    n = len(_ids(live, MSG))
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == n
    assert client.messages.count_tokens(model="tiny", messages=MSG, thinking=OFF).input_tokens == n
    system = client.messages.count_tokens(model="tiny", messages=MSG, thinking=OFF,
                                          system=[{"type": "text", "text": "Be brief.", "cache_control":
                                                   {"type": "ephemeral"}}]).input_tokens
    assert system == len(_ids(live, [{"role": "system", "content": "Be brief."}, *MSG]))
    ignored = client.messages.count_tokens(  # cache_control, beta headers and unknown beta fields change nothing
        model="tiny", thinking=OFF, messages=[{"role": "user", "content": [
            {"type": "text", "text": "Hello there", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}],
        extra_headers={"anthropic-beta": "context-management-2025-06-27,interleaved-thinking-2025-05-14"},
        extra_body={"context_management": {"edits": []}, "some_future_field": 1}).input_tokens
    assert ignored == n


def test_stream_helpers_and_wire_format(client, live):
    whole = _create(client, thinking=OFF, temperature=0)
    with client.messages.stream(model="tiny", messages=MSG, max_tokens=8, thinking=OFF,
                                extra_body={"temperature": 0}) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == len(_ids(live, MSG))
    body = {"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True, "thinking": OFF}
    with httpx.stream("POST", live.url + "/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e.split("\n") for e in raw.split("\n\n") if e]
    names = [e[0].removeprefix("event: ") for e in events]
    events = [(e[0].removeprefix("event: "), e[1]) for e in events]
    assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    for name, data in events:
        assert json.loads(data.removeprefix("data: "))["type"] == name


def test_image(client, live):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 28, 3), dtype=np.uint8)).save(buf, "PNG")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(buf.getvalue()).decode()}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]
    r = _create(client, messages=messages, max_tokens=2, thinking=OFF)
    n = client.messages.count_tokens(model="tiny", messages=messages, thinking=OFF).input_tokens
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == n > len(_ids(live, MSG)) + 20
    assert r.content and r.content[0].type == "text"


def test_forced_tool_call_and_result_round_trip(client, live):
    r = _create(client, tools=TOOLS, tool_choice={"type": "any"}, max_tokens=200, temperature=0)
    assert r.stop_reason == "tool_use"
    [use] = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_") and isinstance(use.input["city"], str)
    turn = [*MSG, {"role": "assistant", "content": r.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}]
    again = _create(client, messages=turn, tools=TOOLS, max_tokens=2, thinking=OFF)
    assert again.content and again.stop_reason in ("max_tokens", "end_turn")
    chat = [*MSG, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": use.input}}]},
        {"role": "tool", "content": "sunny, 21 C"}]
    oa_tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                  "parameters": t["input_schema"]}} for t in TOOLS]
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == len(_ids(live, chat, False, oa_tools))
    blocks = [{"type": "tool_result", "tool_use_id": use.id, "is_error": True,
               "content": [{"type": "text", "text": "no such city"}]}]
    error = client.messages.count_tokens(model="tiny", messages=[*turn[:2], {"role": "user", "content": blocks}],
                                         tools=TOOLS, thinking=OFF).input_tokens
    chat[-1]["content"] = "Error: no such city"
    assert error == len(_ids(live, chat, False, oa_tools))
    named = client.messages.count_tokens(model="tiny", messages=MSG, tools=TOOLS, thinking=OFF,
                                         tool_choice={"type": "tool", "name": "get_weather"}).input_tokens
    forced = live.llm.tokenizer.encode("<tool_call>\n<function=get_weather>\n")
    assert named == len(_ids(live, MSG, False, oa_tools)) + len(forced)
    with pytest.raises(anthropic.BadRequestError):
        _create(client, tools=TOOLS, tool_choice={"type": "tool", "name": "nope"})
    none = _create(client, tools=TOOLS, tool_choice={"type": "none"}, max_tokens=2, thinking=OFF)
    assert none.usage.input_tokens + none.usage.cache_read_input_tokens == len(_ids(live, MSG))


def test_thinking_and_tool_use_parsed_signed_and_sent_back(client, live, monkeypatch):
    scripted(monkeypatch, ["Let me", " think.\n</think>\n\n", "Checking.", CALL])
    thinking = {"type": "enabled", "budget_tokens": 100}
    r = _create(client, tools=TOOLS, thinking=thinking, max_tokens=100)
    assert [b.type for b in r.content] == ["thinking", "text", "tool_use"] and r.stop_reason == "tool_use"
    assert r.content[0].thinking == "Let me think." and r.content[0].signature
    assert r.content[1].text == "Checking." and r.content[2].input == {"city": "Paris"}
    with client.messages.stream(model="tiny", messages=MSG, tools=TOOLS, thinking=thinking, max_tokens=100) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert "signature" in kinds and "input_json" in kinds and "thinking" in kinds
    assert [b.model_dump(exclude={"id"}) for b in final.content] == [b.model_dump(exclude={"id"}) for b in r.content]
    assert final.stop_reason == "tool_use"

    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": r.content[2].id, "content": "21"}]}
    oa_tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                  "parameters": t["input_schema"]}} for t in TOOLS]
    chat = [*MSG, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21"}]

    def count(content) -> int:
        return client.messages.count_tokens(model="tiny", tools=TOOLS, thinking=thinking, messages=[
            *MSG, {"role": "assistant", "content": content}, result]).input_tokens

    with_thought = _ids(live, [*chat[:1], {**chat[1], "reasoning_content": "Let me think."}, chat[2]], True, oa_tools)
    assert count(final.content) == len(with_thought)  # the signed thinking is fed back as reasoning
    tampered = [{**final.content[0].model_dump(), "thinking": "I was told to."}, *final.content[1:]]
    assert count(tampered) == len(_ids(live, chat, True, oa_tools)) < len(with_thought)  # dropped
    scripted(monkeypatch, ["<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n"
                           "</tool_call>\n", CALL])
    both = _create(client, tools=TOOLS, thinking=OFF)
    assert [b.input["city"] for b in both.content] == ["Oslo", "Paris"] and both.content[0].id != both.content[1].id
    one = _create(client, tools=TOOLS, thinking=OFF, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.input["city"] for b in one.content] == ["Oslo"] and one.stop_reason == "tool_use"
    scripted(monkeypatch, ["Done.\n</think>\n\n", "It is 21."])
    nxt = _create(client, tools=TOOLS, thinking=thinking, messages=[
        *MSG, {"role": "assistant", "content": final.content}, result])
    assert nxt.content[-1].text == "It is 21." and nxt.stop_reason == "end_turn"


def test_max_tokens_past_the_context_window(client, live, monkeypatch):
    """max_tokens beyond the context left is cut to it, and running out stops with the newer API's reason."""
    scripted(monkeypatch, ["a", "b"], finish="length")
    assert _create(client, thinking=OFF, max_tokens=2).stop_reason == "max_tokens"
    huge = _create(client, thinking=OFF, max_tokens=live.llm.max_model_len)
    assert huge.stop_reason == "model_context_window_exceeded" and huge.content[0].text == "ab"
    with client.messages.stream(model="tiny", messages=MSG, max_tokens=live.llm.max_model_len, thinking=OFF) as s:
        assert s.get_final_message().stop_reason == "model_context_window_exceeded"
    long = [{"role": "user", "content": "word " * live.llm.max_model_len}]
    assert client.messages.count_tokens(model="tiny", messages=long).input_tokens > live.llm.max_model_len
    with pytest.raises(anthropic.BadRequestError) as e:  # the prompt itself must fit
        _create(client, messages=long, max_tokens=2)
    _error(e.value, 400, "invalid_request_error")


def test_stop_sequences(client):
    full = _create(client, thinking=OFF, temperature=0)
    assert full.stop_reason == "max_tokens"
    text = full.content[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = _create(client, thinking=OFF, temperature=0, stop_sequences=["zzzz-never", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


@pytest.mark.parametrize("budget", [0, 5])
def test_thinking_budget(client, live, budget):
    """budget_tokens N: at most N tokens of thinking, then the answer (random weights never end thinking)."""
    kw = dict(max_tokens=budget + 12, temperature=0)
    bounded = _create(client, thinking={"type": "enabled", "budget_tokens": budget}, **kw)
    unbounded = _create(client, thinking={"type": "adaptive"}, **kw)
    assert [b.type for b in unbounded.content] == ["thinking"] and unbounded.stop_reason == "max_tokens"
    thought = "".join(b.thinking for b in bounded.content if b.type == "thinking")
    assert unbounded.content[0].thinking.startswith(thought)
    assert len(live.llm.tokenizer.encode(thought)) <= budget
    assert bounded.content[-1].type == "text" and bounded.content[-1].text  # the answer followed
    low = _create(client, thinking={"type": "adaptive"}, output_config={"effort": "low"}, **kw)
    assert low.content == unbounded.content  # 1,024 tokens of thinking: more than this answer has


def _error(e: anthropic.APIStatusError, status: int, kind: str) -> None:
    assert e.status_code == status and e.body["type"] == "error" and e.body["error"]["type"] == kind
    assert set(e.body["error"]) == {"type", "message"} and e.body["error"]["message"]


def test_error_shapes(client, live, monkeypatch):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.post("/v1/messages", cast_to=object, body={"model": "tiny", "messages": MSG})
    _error(e.value, 400, "invalid_request_error")
    assert "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        _create(client, messages=[{"role": "system", "content": "hi"}])
    _error(e.value, 400, "invalid_request_error")
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    with pytest.raises(anthropic.BadRequestError) as e:
        _create(client, messages=[{"role": "user", "content": [doc]}])
    _error(e.value, 400, "invalid_request_error")
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", messages=MSG, max_tokens=2)
    _error(e.value, 404, "not_found_error")

    from deltarun.server import streaming
    from deltarun.server.errors import APIError

    async def failing(llm, req, deadline=None):
        raise APIError(408, "too slow", code="request_timeout")
        yield
    monkeypatch.setattr(streaming, "run_request", failing)
    with pytest.raises(anthropic.APIStatusError) as e:
        with client.messages.stream(model="tiny", messages=MSG, max_tokens=5) as s:
            list(s)
    assert e.value.body == {"type": "error", "error": {"type": "timeout_error", "message": "too slow"}}
    monkeypatch.undo()
    assert _create(client, max_tokens=2).content  # still serving


def test_api_key_and_body_size_refusals(chat_ckpt):
    keyed = live_server(chat_ckpt, api_key="s3cret")
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", messages=MSG, max_tokens=2)
    _error(e.value, 401, "authentication_error")
    for kw in ({"api_key": "s3cret"}, {"auth_token": "s3cret"}):  # x-api-key, or Authorization: Bearer
        ok = anthropic.Anthropic(base_url=keyed.url, max_retries=0, **kw)
        assert ok.messages.count_tokens(model="tiny", messages=MSG).input_tokens > 0
    small = live_server(chat_ckpt, max_body_bytes=1000)
    with pytest.raises(anthropic.APIStatusError) as e:
        anthropic.Anthropic(base_url=small.url, api_key="x", max_retries=0).messages.create(
            model="tiny", messages=[{"role": "user", "content": "x" * 2000}], max_tokens=2)
    _error(e.value, 413, "request_too_large")
    foreign = httpx.post(keyed.url + "/v1/messages", headers={"Origin": "http://evil.example", "x-api-key": "s3cret"},
                         json={"model": "tiny", "messages": MSG, "max_tokens": 2}, timeout=30)
    assert foreign.status_code == 403 and foreign.json()["error"]["type"] == "permission_error"


def test_structured_output(client):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    r = _create(client, thinking=OFF, max_tokens=40, temperature=0,
                output_config={"format": {"type": "json_schema", "schema": schema}})
    assert r.stop_reason == "end_turn" and json.loads(r.content[0].text)["answer"] in ("yes", "no")


def test_cache_read_input_tokens_from_the_prefix_cache(client):
    """A repeated long prompt: the prefix cache's whole 64-token blocks are cache reads, the rest input."""
    import uuid

    messages = [{"role": "user", "content": f"{uuid.uuid4().hex} " + "a long shared question about deltas " * 20}]
    first = _create(client, messages=messages, max_tokens=2, thinking=OFF).usage
    with client.messages.stream(model="tiny", messages=messages, max_tokens=2, thinking=OFF) as s:
        second = s.get_final_message().usage
    n = first.input_tokens
    assert first.cache_read_input_tokens == 0 and n > 128
    cached = second.cache_read_input_tokens
    assert cached == (n - 1) // 64 * 64 and second.input_tokens == n - cached
