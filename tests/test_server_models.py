"""Several models in one server (deltarun/server/model_manager.py), through the official `ollama` and `openai`
clients: load on first request (shared by concurrent requests), keep_alive (0, expiry, forever),
--max-loaded-models swaps, the command-line model, the memory check, requests in flight never cut."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import pytest
from model_server import OPTIONS, Server, home, serve, wait_for  # noqa: F401 (fixtures)
from model_server import gen as _gen

from deltarun.server.model_manager import ModelManager
from deltarun.server.targets import resolve_target


def test_two_models_alternate_listed_and_shown_in_ps(serve):
    srv = serve()
    assert srv.ps() == []
    with ThreadPoolExecutor(3) as pool:  # three first requests for one model share one load
        assert all(r.done for r in pool.map(lambda _: _gen(srv, "tiny-a"), range(3)))
    assert srv.models.loads == 1
    answers = {name: [_gen(srv, name).response for _ in range(2)] for name in ("tiny-b", "tiny-a", "tiny-b")}
    assert len(set(answers["tiny-a"])) == 1 and answers["tiny-a"] != answers["tiny-b"]  # other weights
    with ThreadPoolExecutor(4) as pool:  # both models answering at once, each in its own engine
        both = list(pool.map(lambda name: _gen(srv, name).eval_count, ["tiny-a", "tiny-b"] * 2))
    assert both == [3] * 4 and srv.models.loads == 2
    chat = srv.openai.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2)
    assert chat.model == "tiny-b" and chat.usage.completion_tokens == 2
    ps = {m.model: m for m in srv.ollama.ps().models}
    assert set(ps) == {"tiny-a", "tiny-b"} and srv.models.loads == 2
    for m in ps.values():  # default keep_alive: 5 minutes from the last request
        left = (m.expires_at - time.time()) if isinstance(m.expires_at, float) else \
            m.expires_at.timestamp() - time.time()
        assert m.size > 10_000_000 and 280 < left <= 300 and m.context_length == 4096
    tags = [m.model for m in srv.ollama.list().models]
    assert {"tiny-a", "tiny-b", "broken"} <= set(tags)  # loaded first, then every local model
    assert [m.id for m in srv.openai.models.list().data][:2] == [e.name for e in srv.models.entries()]
    assert srv.openai.models.retrieve("tiny-b").id == "tiny-b"
    assert srv.openai.models.retrieve("broken").id == "broken"  # local, not loaded: still a model
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'deltarun_sequences_running{model="tiny-a"} 0' in metrics and "deltarun_models_loaded 2" in metrics


def test_keep_alive_zero_and_the_load_unload_requests(serve):
    srv = serve()
    r = srv.ollama.generate(model="tiny-a")  # no prompt: only loads
    assert r.done_reason == "load" and r.load_duration > 1_000_000 and srv.ps() == ["tiny-a"]
    r = _gen(srv, "tiny-a")
    assert r.load_duration < r.total_duration and r.load_duration < 1_000_000_000  # loaded already
    assert srv.ollama.generate(model="tiny-a", keep_alive=0).done_reason == "unload"
    assert srv.ps() == []
    assert srv.ollama.chat(model="tiny-b", messages=[]).done_reason == "load"
    assert srv.ollama.chat(model="tiny-b", messages=[], keep_alive="0s").done_reason == "unload"
    assert srv.ps() == []
    _gen(srv, "tiny-a", keep_alive=0)  # a real request with keep_alive 0: unloaded once it is answered
    wait_for(lambda: srv.ps() == [], 10, "keep_alive 0 unload")
    assert srv.models.unloads == 3
    with pytest.raises(ollama.ResponseError) as e:
        _gen(srv, "tiny-a", keep_alive="soon")
    assert e.value.status_code == 400 and "keep_alive" in e.value.error


def test_expired_keep_alive_unloads_and_forever_stays(serve):
    srv = serve(keep_alive=60)
    _gen(srv, "tiny-a", keep_alive="300ms")
    _gen(srv, "tiny-b", keep_alive=-1)
    ps = {m.model: m for m in srv.ollama.ps().models}
    assert ps["tiny-b"].expires_at.year == 2999
    wait_for(lambda: srv.ps() == ["tiny-b"], 10, "tiny-a's keep_alive to run out")
    _gen(srv, "tiny-b")  # no keep_alive in the request: the server's default (60 s) applies again
    left = srv.ollama.ps().models[0].expires_at.timestamp() - time.time()
    assert 40 < left <= 60


def test_max_loaded_models_swaps_least_recently_used(serve):
    srv = serve(max_loaded=2)
    for name in ("tiny-a", "tiny-b", "tiny-a"):
        _gen(srv, name)  # tiny-b is now the least recently used
    _gen(srv, "tiny-a2")
    assert srv.ps() == ["tiny-a2", "tiny-a"]
    srv.models.max_loaded = 1
    _gen(srv, "tiny-b")
    assert srv.ps() == ["tiny-b"] and srv.models.unloads == 3


def test_command_line_model_is_kept_and_comes_back_by_its_name(home):
    """The served model (adopted, as `deltarun serve X --served-model-name pinned` does) never expires; when
    evicted for room, its served name still loads it again, kept forever again."""
    from deltarun.async_llm import AsyncLLM

    manager = ModelManager(OPTIONS, max_loaded=1)
    manager.adopt(AsyncLLM(home / "tiny-a", **OPTIONS), "pinned")
    srv = Server(manager)
    try:
        assert srv.ollama.ps().models[0].expires_at.year == 2999
        _gen(srv, "tiny-b")
        assert srv.ps() == ["tiny-b"]
        assert "pinned" in [m.model for m in srv.ollama.list().models]  # still listed and shown, unloaded
        assert srv.ollama.show("pinned").modelinfo["qwen35.context_length"] == 4096
        _gen(srv, "pinned")
        ps = srv.ollama.ps().models
        assert [m.model for m in ps] == ["pinned"] and ps[0].expires_at.year == 2999
    finally:
        srv.stop()


def test_memory_check_unloads_idle_models_first(serve, home):
    est = resolve_target("tiny-a", OPTIONS).estimate
    srv = serve()
    size = {}

    def free() -> int:  # a machine with room for one model: what is loaded takes its share
        return est + size.get("a", 0) // 2 - sum(e.size for e in srv.models.loaded.values())
    srv.models.free_memory = free
    _gen(srv, "tiny-a")
    size["a"] = srv.models.loaded[next(iter(srv.models.loaded))].size
    _gen(srv, "tiny-b")
    assert srv.ps() == ["tiny-b"]
    srv.models.free_memory = lambda: 1000
    _gen(srv, "tiny-b")  # already loaded: no check
    r = httpx.post(srv.url + "/api/generate", json={"model": "tiny-a", "prompt": "hi"}, timeout=30)
    assert r.status_code == 503 and "not enough memory to load 'tiny-a'" in r.json()["error"]
    assert srv.ps() == []  # tiny-b was unloaded to try; nothing fits


def _slow(target, options):
    """A real model whose engine steps take a while, so a request is surely in flight meanwhile."""
    from deltarun.server.targets import load_llm

    llm = load_llm(target, options)
    step = llm.engine.step

    def slow_step():
        time.sleep(0.05)
        return step()
    llm.engine.step = slow_step
    return llm


def test_request_in_flight_is_never_cut(serve):
    srv = serve(max_loaded=1, factory=_slow, room_timeout=0.3)
    body = {"model": "tiny-a", "prompt": "Once", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")  # tiny-a is answering
        r = httpx.post(srv.url + "/api/generate", json={"model": "tiny-b", "prompt": "hi"}, timeout=30)
        assert r.status_code == 503 and "answering requests" in r.json()["error"]  # waited 0.3 s, then gave up
        srv.models.room_timeout = 30
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(_gen, srv, "tiny-b")  # waits for tiny-a's request to end
            wait_for(lambda: srv.models._wanted, 10, "tiny-b to wait for room")
            assert srv.ps() == ["tiny-a"]
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert other.result(timeout=60).done
    assert rest[-1]["usage"]["completion_tokens"] == 40  # all 40 tokens came
    assert [c["finish_reason"] for r in rest for c in r["choices"] if c["finish_reason"]] == ["length"]
    assert srv.ps() == ["tiny-b"]
