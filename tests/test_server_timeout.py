"""`--request-timeout`: a generation that runs longer ends with an error in its API's shape (408 when not
streaming, an error event the official clients raise when streaming) and leaves nothing in the engine.

The engine is slowed down (each step sleeps) so that an answer reliably outlasts the timeout; requests go to
127.0.0.1 only."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from server_helpers import live_server, wait_idle

TIMEOUT = 0.6
LONG = 400  # tokens: at ≥ 20 ms a step, far past the timeout


@pytest.fixture()
def slow(chat_ckpt, monkeypatch):
    from deltarun.ops import kernels

    kernels.available()  # a first build of the CPU kernels (minutes) must not count against the timeout
    live = live_server(chat_ckpt, request_timeout=TIMEOUT)
    eng = live.llm.engine
    step = eng.step

    def slow_step():
        time.sleep(0.02)
        return step()
    monkeypatch.setattr(eng, "step", slow_step)
    yield live
    assert wait_idle(live.llm), "a timed-out request was left running in the engine"
    assert len(eng.pool.free_slots) == eng.pool.num_slots


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG, "ignore_eos": True}


def test_non_streaming_answers_408_in_each_shape(slow):
    t = time.perf_counter()
    r = httpx.post(slow.url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    assert time.perf_counter() - t < TIMEOUT + 5
    r = httpx.post(slow.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": ["a", "b"], "max_tokens": LONG, "ignore_eos": True})
    assert r.status_code == 408 and "request-timeout" in r.json()["error"]["message"]
    r = httpx.post(slow.url + "/api/generate", timeout=60, json={"model": "tiny", "prompt": "hi", "stream": False,
                                                                 "options": {"num_predict": LONG}})
    assert r.status_code == 408 and set(r.json()) == {"error"}


def test_streams_end_with_an_error_event_the_clients_raise(slow):
    import ollama
    import openai

    client = openai.OpenAI(base_url=slow.url + "/v1", api_key="x", max_retries=0)
    got = []
    with pytest.raises(openai.APIError, match="request-timeout"):
        for chunk in client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=LONG,
                                                    stream=True, extra_body={"ignore_eos": True}):
            got.append(chunk)
    assert got  # it did stream before the deadline
    with pytest.raises(openai.APIError, match="request-timeout"):
        for _ in client.completions.create(model="tiny", prompt="hi", max_tokens=LONG, stream=True,
                                           extra_body={"ignore_eos": True}):
            pass
    with httpx.stream("POST", slow.url + "/api/chat", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                            "options": {"num_predict": LONG}}) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert r.status_code == 200 and "request-timeout" in lines[-1]["error"] and set(lines[-1]) == {"error"}
    with pytest.raises(ollama.ResponseError, match="request-timeout"):
        for _ in ollama.Client(host=slow.url).generate(model="tiny", prompt="hi", stream=True,
                                                       options={"num_predict": LONG}):
            pass


def test_requests_within_the_timeout_are_served(slow):
    r = httpx.post(slow.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_timeout_must_be_positive():
    from deltarun.server import create_app

    with pytest.raises(ValueError, match="positive"):
        create_app(None, request_timeout=0)


def test_cli_refuses_a_bad_timeout_before_loading(capsys):
    """One line, exit 1, and no model load first ("demo" would be written and loaded otherwise)."""
    from deltarun.cli import main

    assert main(["serve", "demo", "--request-timeout", "0"]) == 1
    assert "--request-timeout must be a positive number" in capsys.readouterr().err
