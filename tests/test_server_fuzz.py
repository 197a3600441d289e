"""The OpenAPI schema (/openapi.json) and a bounded schemathesis fuzz against it (fuzz_driver.py): no 5xx, no
traceback in the server log, every error body in its API's shape, every valid body answered with a 2xx, and
every route fuzzed. The long run is benchmarks/fuzz_server.py (its numbers: docs/benchmarks.md)."""
import httpx
import pytest
from fuzz_driver import fuzz_server, run
from server_helpers import live_server

BODY_ROUTES = {("post", "/v1/chat/completions"), ("post", "/v1/completions"), ("post", "/api/chat"),
               ("post", "/api/generate"), ("post", "/api/show"), ("post", "/api/pull"),
               ("delete", "/api/delete"), ("post", "/api/copy")}


def test_openapi_schema_declares_every_body(chat_ckpt):
    live = live_server(chat_ckpt)
    r = httpx.get(live.url + "/openapi.json", timeout=30)
    assert r.status_code == 200
    spec = r.json()
    ops = {(m, p): op for p, item in spec["paths"].items() for m, op in item.items()}
    for key in BODY_ROUTES:
        body = ops[key]["requestBody"]["content"]["application/json"]["schema"]
        name = body["$ref"].rsplit("/", 1)[1]
        assert spec["components"]["schemas"][name]["properties"], key
        # an invalid body is a 400 in the API's own error shape, not FastAPI's 422
        error = ops[key]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert "422" not in ops[key]["responses"] and error.endswith("OllamaError" if "/api/" in key[1]
                                                                    else "OpenAIError"), key
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is True  # lenient: newer clients' fields are accepted
    assert chat["properties"]["temperature"]["anyOf"][0]["minimum"] == 0  # the sampler's ranges are declared
    assert httpx.get(live.url + "/docs").status_code == 404 and httpx.get(live.url + "/redoc").status_code == 404


def test_openapi_schema_is_guarded(chat_ckpt):
    live = live_server(chat_ckpt, api_key="sekret")
    assert httpx.get(live.url + "/openapi.json").status_code == 401
    assert httpx.get(live.url + "/openapi.json", headers={"x-api-key": "sekret"}).status_code == 200
    r = httpx.get(live.url + "/openapi.json", headers={"x-api-key": "sekret", "Host": "evil.example.com"})
    assert r.status_code == 403 and r.json()["error"]["message"].startswith("this server does not answer")


def test_fuzz(chat_ckpt, tmp_path, capsys):
    with fuzz_server(chat_ckpt, tmp_path) as live:
        report = run(live.url, live.raw_schema, max_examples=6, seed=20)
        tracebacks = live.log.tracebacks
        routes = {f"{m.upper()} {p}" for p, item in live.raw_schema["paths"].items() for m in item}
    with capsys.disabled():
        print("\n" + report.table(len(tracebacks)))
    assert routes == set(report.cases), "every route gets cases"
    assert all(sum(c.values()) >= 1 for c in report.cases.values())
    assert not report.failures, "\n".join(f"{r}: {p}\n  {q[:500]}" for r, p, q in report.failures[:10])
    assert not tracebacks, tracebacks[0]
    # nothing was pulled or copied into the store (the one thing there: the start-up's tokenizer verdict cache)
    assert {p.name for p in (tmp_path / "deltarun_home").iterdir()} <= {"tokenizers"}
    assert all(p.suffix == ".builtin" for p in (tmp_path / "deltarun_home").glob("tokenizers/*"))


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_fuzz_check_can_fail(path):
    """The driver's checks flag what they are for (a fuzz that cannot fail proves nothing)."""
    from fuzz_driver import check

    route = f"POST {path}"
    assert check(route, path, False, 500, '{"error": "x"}')
    ollama = path.startswith("/api/")
    wrong_shape = '{"error": {"message": "m", "type": "t"}}' if ollama else '{"error": "m"}'
    assert check(route, path, False, 400, wrong_shape)
    right_shape = '{"error": "m"}' if ollama else '{"error": {"message": "m", "type": "t"}}'
    assert check(route, path, False, 400, right_shape) is None
    assert check(route, path, True, 400, right_shape)  # a valid body refused
    cut = ("application/x-ndjson", '{"done": false}\n') if ollama else ("text/event-stream", "data: {}\n\n")
    assert check(route, path, True, 200, cut[1], cut[0])


def test_stream_ends_of_the_agent_apis():
    """Responses streams end with a terminal response event, Messages streams with message_stop or error."""
    from fuzz_driver import check

    sse = "text/event-stream"
    done = 'event: response.completed\ndata: {}\n\n'
    assert check("POST /v1/responses", "/v1/responses", True, 200, done, sse) is None
    assert check("POST /v1/responses", "/v1/responses", True, 200, 'event: response.created\ndata: {}\n\n', sse)
    assert check("POST /v1/messages", "/v1/messages", True, 200, 'event: message_stop\ndata: {}\n\n', sse) is None
    assert check("POST /v1/messages", "/v1/messages", True, 200, 'event: ping\ndata: {}\n\n', sse)


def test_log_tap_sees_server_tracebacks():
    """uvicorn's "Exception in ASGI application" and the server's own internal errors reach the tap."""
    import logging

    from fuzz_driver import LOGGERS, LogTap

    tap = LogTap()
    for name in LOGGERS:
        logging.getLogger(name).addHandler(tap)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        logging.getLogger("deltarun.server").error("internal error abc on POST /api/chat")
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(tap)
    assert len(tap.tracebacks) == 2 and "boom" in tap.tracebacks[0]
