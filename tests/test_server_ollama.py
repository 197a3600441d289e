"""Ollama API end to end: the official `ollama` client (and raw HTTP for NDJSON) against a live server."""
import json

import httpx
import ollama
import pytest
from server_helpers import live_server, scripted

MSG = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def live(chat_ckpt):
    return live_server(chat_ckpt)


@pytest.fixture(scope="module")
def client(live):
    return ollama.Client(host=live.url)


def test_chat_counts_and_durations(client):
    r = client.chat(model="tiny", messages=MSG, options={"num_predict": 4, "temperature": 0})
    assert r.done and r.done_reason == "length" and r.eval_count == 4 and r.prompt_eval_count > 4
    assert r.total_duration >= r.eval_duration > 0 and r.message.role == "assistant" and r.message.content
    parts = list(client.chat(model="tiny", messages=MSG, options={"num_predict": 4, "temperature": 0}, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and parts[-1].eval_count == 4 and not any(p.done for p in parts[:-1])


def test_ndjson_wire(live):
    body = {"model": "tiny", "messages": MSG, "options": {"num_predict": 3}}
    with httpx.stream("POST", live.url + "/api/chat", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
    assert all(isinstance(lines[-1][k], int) for k in ("total_duration", "eval_count", "prompt_eval_duration"))


def test_generate_raw_context_and_seed(client):
    a = client.generate(model="tiny", prompt="Once upon", raw=True, options={"num_predict": 3, "seed": 3})
    b = client.generate(model="tiny", prompt="Once upon", raw=True, options={"num_predict": 3, "seed": 3})
    assert a.response == b.response and a.context[-3:] and len(a.context) == a.prompt_eval_count + 3
    cont = client.generate(model="tiny", prompt=" more", context=a.context, raw=True, options={"num_predict": 1})
    assert cont.prompt_eval_count == len(a.context) + 1


def test_think_and_format(client):
    r = client.chat(model="tiny", messages=MSG, think=True, options={"num_predict": 4, "temperature": 0})
    if "</think>" not in (r.message.thinking or ""):
        assert r.message.thinking and not r.message.content
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat(model="tiny", messages=MSG, format=schema, options={"num_predict": 20, "seed": 1})
    assert set(json.loads(r.message.content)) == {"ok"}
    g = client.generate(model="tiny", prompt="hi", format=schema, options={"num_predict": 20})
    assert set(json.loads(g.response)) == {"ok"}


def test_model_routes(client, live):
    assert [m.model for m in client.list().models][0] == "tiny"  # loaded first, then the machine's local models
    show = client.show("tiny")
    assert "tools" in show.capabilities and show.details.family == "qwen35"
    assert client.ps().models[0].model == "tiny"
    assert httpx.get(live.url + "/api/version").json()["version"]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(live.url + "/metrics").text
    assert "deltarun_requests_total" in metrics and "deltarun_time_to_first_token_seconds_bucket" in metrics


def test_errors(client, live):
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="missing", messages=MSG)
    assert info.value.status_code == 404
    r = httpx.post(live.url + "/api/chat", json={"model": "tiny", "messages": MSG, "options": {"temperature": "hot"}})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(live.url + "/api/generate", content=b"{oops")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(live.url + "/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                   "options": {"top_p": 5}})
    assert r.status_code == 400 and "top_p" in r.json()["error"]
    assert client.chat(model="tiny:latest", messages=MSG, options={"num_predict": 1}).done


def test_tool_calls(client, monkeypatch):
    scripted(monkeypatch, ["<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n",
                           "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    for stream in (False, True):
        out = client.chat(model="tiny", messages=MSG, tools=tools, stream=stream)
        parts = list(out) if stream else [out]
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris", "days": 2})]
        assert "".join(p.message.content for p in parts) == ""
