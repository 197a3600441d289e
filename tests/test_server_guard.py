"""The server's gate (deltarun/server/guard.py, app.py): Host names (DNS rebinding), browser Origins on
state-changing routes, the body types curl and the clients send, the size cap on chunked bodies, the API key
headers, and 500s that name no server detail. Every request goes to 127.0.0.1; a foreign name appears only
in the Host / Origin headers a hostile page's browser would send."""
from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import live_server

from deltarun.server.guard import allowed_hosts, host_name

EVIL = "evil.example.com"
GEN = {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}


@pytest.fixture(scope="module")
def live(chat_ckpt):
    return live_server(chat_ckpt)


def _port(live) -> str:
    return live.url.rsplit(":", 1)[1]


def test_host_names():
    assert host_name("LOCALHOST:11435") == "localhost" and host_name("[::1]:80") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1" and host_name("::1") == "::1"
    local = allowed_hosts("127.0.0.1")
    assert all(local(n) for n in ("localhost", "127.0.0.1", "::1", "127.0.0.2"))
    assert not any(local(n) for n in (EVIL, "10.0.0.5", "", "localhost.evil.example.com"))
    assert allowed_hosts("127.0.0.1", ["my.box"])("my.box")
    assert allowed_hosts("127.0.0.1", ["*"])(EVIL)
    everywhere = allowed_hosts("0.0.0.0")
    assert everywhere("192.168.1.20") and everywhere("fe80::1") and not everywhere(EVIL)
    one = allowed_hosts("192.168.1.20")
    assert one("192.168.1.20") and not one("192.168.1.21") and not one(EVIL)


def test_allowed_hosts_from_the_environment(monkeypatch):
    monkeypatch.setenv("DELTARUN_ALLOWED_HOSTS", "a.lan, b.lan")
    ok = allowed_hosts("127.0.0.1")
    assert ok("a.lan") and ok("b.lan") and not ok("c.lan")


def test_dns_rebinding_cannot_reach_any_route(live):
    """A page that points its own name at 127.0.0.1 sends that name as Host: every route refuses, in its
    API's error shape, and nothing changed."""
    bad = {"Host": f"{EVIL}:{_port(live)}", "Origin": f"http://{EVIL}"}
    calls = [("GET", "/api/tags", None), ("GET", "/v1/models", None), ("POST", "/api/generate", GEN),
             ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
             ("POST", "/v1/messages", {"model": "tiny", "max_tokens": 2,
                                       "messages": [{"role": "user", "content": "hi"}]}),
             ("POST", "/v1/responses", {"model": "tiny", "input": "hi"}),
             ("DELETE", "/api/delete", {"model": "tiny"}),
             ("POST", "/api/copy", {"source": "tiny", "destination": "x"}),
             ("POST", "/api/pull", {"model": "Qwen/Qwen3.5-0.8B"}), ("POST", "/api/show", {"model": "tiny"})]
    for method, path, body in calls:
        r = httpx.request(method, live.url + path, json=body, headers=bad, timeout=30)
        assert r.status_code == 403, (method, path, r.text)
        err = r.json()["error"]
        assert "Host" in (err if path.startswith("/api/") else err["message"]), path
    names = [m["name"] for m in httpx.get(live.url + "/api/tags", timeout=30).json()["models"]]
    assert "tiny" in names and "x" not in names


def test_foreign_origin_refused_on_state_changing_routes(live):
    own = {"Origin": f"http://127.0.0.1:{_port(live)}"}
    foreign = {"Origin": f"http://{EVIL}"}
    r = httpx.post(live.url + "/api/generate", json=GEN, headers=foreign, timeout=30)
    assert r.status_code == 403 and "origin" in r.json()["error"]
    r = httpx.request("DELETE", live.url + "/api/delete", json={"model": "tiny"}, headers={"Origin": "null"},
                      timeout=30)
    assert r.status_code == 403
    assert httpx.post(live.url + "/api/generate", json=GEN, headers=own, timeout=60).status_code == 200
    assert httpx.get(live.url + "/api/tags", headers=foreign, timeout=30).status_code == 200  # reads: CORS rules


def test_cors_origin_may_post(chat_ckpt):
    live = live_server(chat_ckpt, cors_origins=["http://app.example"])
    r = httpx.post(live.url + "/api/generate", json=GEN, headers={"Origin": "http://app.example"}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"


@pytest.mark.parametrize("ctype", [None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                   "application/json; charset=utf-8"])
def test_json_bodies_under_every_simple_content_type(live, ctype):
    """`curl -d '{...}'` sends x-www-form-urlencoded (Ollama's docs use exactly that): read as JSON."""
    headers = {"Content-Type": ctype} if ctype else {}
    r = httpx.post(live.url + "/api/generate", content=json.dumps(GEN).encode(), headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    if ctype is None:  # httpx adds none for raw content: check that no Content-Type really went out
        assert "content-type" not in r.request.headers
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = httpx.post(live.url + "/v1/chat/completions", content=json.dumps(body).encode(), headers=headers, timeout=60)
    assert r.status_code == 200, r.text


def test_multipart_is_415_in_each_api_shape(live):
    files = {"file": ("a.json", json.dumps(GEN).encode(), "application/json")}
    r = httpx.post(live.url + "/api/generate", files=files, timeout=30)
    assert r.status_code == 415 and "multipart" in r.json()["error"]
    r = httpx.post(live.url + "/v1/chat/completions", files=files, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"


def test_chunked_body_over_the_cap_is_413(chat_ckpt):
    small = live_server(chat_ckpt, max_body_bytes=1000)

    def chunks():  # no Content-Length: the cap must hold while the body streams in
        for _ in range(50):
            yield b" " * 100

    r = httpx.post(small.url + "/api/generate", content=chunks(), timeout=30)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json() == {"error": "request body larger than 1000 bytes"}
    fits = iter([json.dumps(GEN).encode()])
    assert httpx.post(small.url + "/api/generate", content=fits, timeout=60).status_code == 200


def test_a_500_names_no_detail(live, monkeypatch, caplog):
    from deltarun.server import openai_completions

    def boom(*a, **k):
        raise RuntimeError("/home/someone/secret/path exploded")
    monkeypatch.setattr(openai_completions, "_model_card", boom)
    with caplog.at_level("ERROR", logger="deltarun.server"):
        r = httpx.get(live.url + "/v1/models", timeout=30)
    assert r.status_code == 500
    message = r.json()["error"]["message"]
    assert "secret" not in r.text and message.startswith("internal error (request id ")
    rid = message.split("request id ")[1].split(";")[0]
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)  # the details: the log
    monkeypatch.undo()
    assert httpx.get(live.url + "/v1/models", timeout=30).status_code == 200  # and it keeps serving


def test_model_names_never_reach_the_disk(live, chat_ckpt, tmp_path):
    """A client names only what the store lists (and copies of it): a path in any spelling gets one answer,
    whether or not it exists, on every route that takes a model name; nothing is copied or deleted."""
    import os

    fake = tmp_path / "folder"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    existing = [str(chat_ckpt), os.path.relpath(chat_ckpt), str(fake), os.path.relpath(fake)]
    missing = [str(tmp_path / "nothing"), "../../etc", "~/x", "C:/Windows", "..%2F..%2Fetc", "a\\b", "./x", "a//b"]

    def answers(name: str) -> list[tuple[int, str]]:
        out = []
        for method, path, body in (("POST", "/api/show", {"model": name}),
                                   ("POST", "/api/generate", {**GEN, "model": name}),
                                   ("DELETE", "/api/delete", {"model": name}),
                                   ("POST", "/api/copy", {"source": name, "destination": "copied"}),
                                   ("POST", "/v1/chat/completions",
                                    {"model": name, "messages": [{"role": "user", "content": "hi"}]}),
                                   ("POST", "/v1/messages", {"model": name, "max_tokens": 2,
                                                             "messages": [{"role": "user", "content": "hi"}]})):
            r = httpx.request(method, live.url + path, json=body, timeout=30)
            err = r.json()["error"]
            out.append((r.status_code, (err if isinstance(err, str) else err["message"]).replace(repr(name), "NAME")))
        return out
    first = answers(existing[0])
    assert all(code == 404 for code, _ in first), first
    for name in existing[1:] + missing:
        assert answers(name) == first, name  # the same answer: no oracle for what exists on the disk
    assert chat_ckpt.exists() and (fake / "config.json").exists()
    names = [m["name"] for m in httpx.get(live.url + "/api/tags", timeout=30).json()["models"]]
    assert "copied" not in names
    r = httpx.post(live.url + "/api/copy", json={"source": "tiny", "destination": "../escape"}, timeout=30)
    assert r.status_code == 400 and "not a path" in r.json()["error"]


def test_what_counts_as_a_path():
    from deltarun.store.names import looks_like_path

    for name in ("qwen3.5:0.8b", "Qwen/Qwen3.5-0.8B", "demo", "mine:latest", "qwen3.5:9b-q4_K_M", "q:4b",
                 "registry.ollama.ai/library/qwen3.5:latest", "Qwen/Qwen3.5-2B-int4"):
        assert not looks_like_path(name), name
    for name in ("/abs", "./rel", "../up", "a/../b", "~/x", "~user", "C:/x", "c:\\x", "a\\b", "..%2Fetc",
                 "%2e%2e", "a//b", "a/", "", " ", ".hidden", "a\0b"):
        assert looks_like_path(name), name


def test_a_full_queue_answers_429_with_retry_after(chat_ckpt, monkeypatch):
    """While `max_queued_requests` requests already wait in a model's engine, a new one is refused at once
    (429, Retry-After, each API's error shape, the official client's RateLimitError); below it, served."""
    import dataclasses

    import openai

    live = live_server(chat_ckpt, max_queued_requests=3)
    real = live.llm.stats
    monkeypatch.setattr(live.llm, "stats", lambda: dataclasses.replace(real(), requests_waiting=3))
    r = httpx.post(live.url + "/api/generate", json=GEN, timeout=30)
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "waiting" in r.json()["error"]
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    import anthropic

    with pytest.raises(anthropic.RateLimitError) as e:
        anthropic.Anthropic(base_url=live.url, api_key="x", max_retries=0).messages.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert e.value.body["error"]["type"] == "rate_limit_error" and e.value.response.headers["retry-after"] == "1"
    monkeypatch.setattr(live.llm, "stats", lambda: dataclasses.replace(real(), requests_waiting=2))
    assert httpx.post(live.url + "/api/generate", json=GEN, timeout=60).status_code == 200


def test_api_key_from_environment_or_file(monkeypatch, tmp_path):
    """A key on argv shows in `ps`: `serve` also takes it from $DELTARUN_API_KEY or a file's first line."""
    from deltarun.cli.main import api_key_of, build_parser

    monkeypatch.setenv("DELTARUN_API_KEY", "from-env")
    assert api_key_of(build_parser().parse_args(["serve"])) == "from-env"
    key = tmp_path / "key"
    key.write_text("from-file\nignored\n")
    assert api_key_of(build_parser().parse_args(["serve", "--api-key-file", str(key)])) == "from-file"
    monkeypatch.delenv("DELTARUN_API_KEY")
    assert api_key_of(build_parser().parse_args(["serve"])) is None
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        if bad.name == "empty":
            bad.write_text("\n")
        with pytest.raises(SystemExit, match="no API key in"):
            api_key_of(build_parser().parse_args(["serve", "--api-key-file", str(bad)]))


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.7", "169.254.169.254", "100.64.0.1",
                                     "::1", "fe80::1", "fd00::5", "0.0.0.0", "224.0.0.1"])
def test_media_urls_to_private_addresses_are_refused(monkeypatch, address):
    """SSRF: a URL whose host resolves (stubbed resolver: no traffic leaves) to a non-public address is
    refused before any connection, and so is a redirect to one; --allow-private-media lifts it."""
    import socket
    import urllib.request

    from deltarun.processor import fetch

    def resolver(host, *a, **k):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, 80))]
    opened = []
    monkeypatch.setattr(fetch, "_resolve", resolver)
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", lambda self, *a, **k: opened.append(a) or 1 / 0)
    with pytest.raises(ValueError, match="private address .*--allow-private-media"):
        fetch.fetch("http://media.example/cat.png", 1000, "image")
    with pytest.raises(Exception, match="redirected to a refused address"):
        fetch._CheckedRedirects().redirect_request(None, None, 302, "Found", {}, "http://inner.example/x")
    assert opened == []
    with pytest.raises(ZeroDivisionError):  # allowed: it would connect (the stub stands in for the network)
        fetch.fetch("http://media.example/cat.png", 1000, "image", allow_private=True)
    assert len(opened) == 1


def test_public_media_addresses_pass_the_check(monkeypatch):
    import socket

    from deltarun.processor import fetch

    monkeypatch.setattr(fetch, "_resolve", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                                              ("93.184.216.34", 80))])
    assert fetch.private_reason("https://media.example/cat.png") is None
    assert fetch.private_reason("http:///nohost") == "the URL names no host"


def _media_server(routes: dict[str, tuple[int, dict[str, str], bytes]]):
    """A one-thread HTTP server on 127.0.0.1 answering `routes` (path → status, headers, body)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_name_that_rebinds_after_the_check_is_refused(monkeypatch):
    """DNS rebinding: the name answers a public address to the first lookup and a private one afterwards.
    The connection is checked on the addresses it uses, so the second answer is refused before any socket
    connects (the stub resolver stands in for DNS: no traffic leaves)."""
    import socket

    from deltarun.processor import fetch

    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1"])
    monkeypatch.setattr(fetch, "_resolve", lambda host, port, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                                                      (next(answers), port or 80))])
    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connects.append(addr) or 1 / 0)
    with pytest.raises(ValueError, match=r"private address \(127.0.0.1\)"):
        fetch.fetch("http://media.example/cat.png", 1000, "image")
    assert connects == []


def test_the_fetch_connects_to_the_address_it_checked(monkeypatch):
    """The name is resolved once, by the check, and the socket goes to that address: here a server on
    127.0.0.1 that the stubbed check treats as public (the system resolver never sees media.example). A
    redirect leaving http(s) is refused."""
    import socket

    from deltarun.processor import fetch

    server = _media_server({"/cat.png": (200, {}, b"meow"), "/ftp": (302, {"Location": "ftp://media.example/x"}, b""),
                            "/hop": (302, {"Location": "/cat.png"}, b"")})
    port = server.server_address[1]
    try:
        monkeypatch.setattr(fetch, "_public", lambda addr: True)
        monkeypatch.setattr(fetch, "_resolve", lambda host, p, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                                                       ("127.0.0.1", p or port))])
        assert fetch.fetch(f"http://media.example:{port}/cat.png", 100, "image") == b"meow"
        assert fetch.fetch(f"http://media.example:{port}/hop", 100, "image") == b"meow"
        with pytest.raises(ValueError, match="only http and https"):
            fetch.fetch(f"http://media.example:{port}/ftp", 100, "image")
        with pytest.raises(ValueError, match="larger than 3 bytes"):
            fetch.fetch(f"http://media.example:{port}/cat.png", 3, "image")
    finally:
        server.shutdown()
