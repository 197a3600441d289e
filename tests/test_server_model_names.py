"""The multi-model server and names: unknown names (404 with a hint), load failures, copied names,
quantization tags, keep_alive values; `deltarun serve MODEL` as a subprocess with `deltarun ps`."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import httpx
import ollama
import openai
import pytest
from model_server import gen as _gen
from model_server import home, serve, wait_for  # noqa: F401 (fixtures)

from deltarun.server.targets import parse_keep_alive


def test_unknown_names_and_load_failures(serve):
    srv = serve()
    with pytest.raises(ollama.ResponseError) as e:
        srv.ollama.chat(model="tiny-c", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "did you mean" in e.value.error
    assert "'tiny-a'" in e.value.error and "'tiny-b'" in e.value.error
    with pytest.raises(openai.NotFoundError) as e2:
        srv.openai.chat.completions.create(model="qwen3.5:8b", messages=[{"role": "user", "content": "hi"}])
    err = e2.value.body
    assert err["type"] == "not_found_error" and err["param"] == "model"
    assert "did you mean 'qwen3.5:0.8b'" in err["message"]
    with pytest.raises(openai.NotFoundError):
        srv.openai.models.retrieve("tiny-c")
    r = httpx.post(srv.url + "/api/generate", json={"model": "/etc", "prompt": "hi"}, timeout=30)
    assert r.status_code == 404 and "by name" in r.json()["error"]  # clients never name server paths
    for _ in range(2):  # a failed load leaves nothing behind: the next request tries again
        r = httpx.post(srv.url + "/api/generate", json={"model": "broken", "prompt": "hi"}, timeout=30)
        assert r.status_code == 500 and "could not load model 'broken'" in r.json()["error"]
        assert ".safetensors" in r.json()["error"] and "/" not in r.json()["error"]  # the reason, no server path
    assert _gen(srv, "tiny-a").done and srv.ps() == ["tiny-a"]


def test_quantization_tag_loads_a_quantized_copy(serve, home):
    """`qwen3.5:0.8b-int4` loads the local 0.8B folder with quantization="int4": another model beside the
    full-precision one, smaller, shown as INT4."""
    from test_models_cli import _hf_repo

    hf = home.parent / "hf" / "models--Qwen--Qwen3.5-0.8B"
    _hf_repo(home.parent / "hf", "Qwen/Qwen3.5-0.8B", home / "tiny-a")
    try:
        srv = serve()
        assert _gen(srv, "qwen3.5:0.8b-int4").done and _gen(srv, "qwen3.5:0.8b").done
        ps = {m.model: m for m in srv.ollama.ps().models}
        assert list(ps) == ["qwen3.5:0.8b", "qwen3.5:0.8b-int4"] and srv.models.loads == 2
        assert ps["qwen3.5:0.8b-int4"].details.quantization_level == "INT4"
        assert ps["qwen3.5:0.8b"].details.quantization_level == "FLOAT32"
        assert ps["qwen3.5:0.8b-int4"].size < ps["qwen3.5:0.8b"].size / 4
        with pytest.raises(ollama.ResponseError) as e:  # a GGUF tag names a file in Ollama's store
            _gen(srv, "qwen3.5:0.8b-q4_k_m")
        assert e.value.status_code == 404 and "not in Ollama's store" in e.value.error
    finally:
        shutil.rmtree(hf)


def test_gguf_in_ollamas_store_is_served(serve, home):
    """A GGUF model in Ollama's store (manifest → blob), as `ollama pull` leaves it, served by its Ollama
    name, read in place: the same answer as the safetensors folder it was converted from."""
    from gguf_writer import write_gguf
    from test_models_cli import _ollama_model

    store = home.parent / "ollama"
    write_gguf(home / "tiny-a", home.parent / "tiny.gguf", tokenizer=True)
    blob = _ollama_model(store, "qwen3.5", "tiny", (home.parent / "tiny.gguf").read_bytes(), "F32")
    try:
        srv = serve()
        assert _gen(srv, "qwen3.5:tiny").response == _gen(srv, "tiny-a").response
        ps = {m.model: m for m in srv.ollama.ps().models}
        assert set(ps) == {"qwen3.5:tiny", "tiny-a"} and blob.is_file()
        assert "qwen3.5:tiny" in [m.model for m in srv.ollama.list().models]
    finally:
        shutil.rmtree(store)
        (home.parent / "tiny.gguf").unlink()


def test_copied_names_and_deleting_a_loaded_model(serve, home):
    shutil.copytree(home / "tiny-a", home / "tiny-del")
    srv = serve()
    assert srv.ollama.copy("tiny-del", "fast:latest").status == "success"
    _gen(srv, "tiny-del")
    _gen(srv, "fast")  # the copy is the same model: no second load
    assert srv.models.loads == 1 and srv.ps() == ["tiny-del"]
    assert srv.ollama.delete("fast:latest").status == "success"  # only the name
    with pytest.raises(ollama.ResponseError) as e:
        _gen(srv, "fast")
    assert e.value.status_code == 404
    assert srv.ollama.delete("tiny-del").status == "success"  # loaded and idle: unloaded, then deleted
    assert srv.ps() == [] and not (home / "tiny-del").exists()


@pytest.mark.parametrize("value,seconds", [("5m", 300), ("1h30m", 5400), ("300ms", 0.3), (30, 30), ("45", 45),
                                           (0, 0), ("0", 0), (-1, None), ("-1m", None), (2.5, 2.5)])
def test_parse_keep_alive(value, seconds):
    assert parse_keep_alive(value) == (seconds if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize("value", ["soon", "5 m", "", "m5", True, [1]])
def test_parse_keep_alive_rejects(value):
    with pytest.raises(ValueError):
        parse_keep_alive(value)


def test_serve_preloads_its_model_and_ps_shows_expiry(home, capsys):
    """`deltarun serve tiny-a` as a user runs it: tiny-a loaded at start and kept, others loaded on request
    for --keep-alive; `deltarun ps` shows both. (With no MODEL it starts empty: the parser test below.)"""
    from deltarun.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "deltarun.cli", "serve", "tiny-a", "--port", str(port),
                             "--dtype", "float32", "--max-loaded-models", "2", "--keep-alive", "1m"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{port}")

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                return False
        wait_for(up, 60, "deltarun serve")
        assert [m.model for m in client.ps().models] == ["tiny-a"]
        assert client.generate(model="tiny-b", prompt="hi", options={"num_predict": 2}).done
        assert main(["ps", "--port", str(port)]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
        left = re.search(r"(\d+) seconds? from now|1 minute from now", rows["tiny-b"])
        assert "100% CPU" in rows["tiny-b"] and left and 30 <= int(left.group(1) or 60) <= 60, rows
        assert rows["tiny-a"].rstrip().endswith("forever")
        # SIGTERM mid-answer: the server stops accepting, lets the answer finish (--drain-timeout), exits 0
        lines: list[dict] = []

        def stream() -> None:
            body = {"model": "tiny-a", "prompt": "hi", "options": {"num_predict": 400}}
            with httpx.stream("POST", f"http://127.0.0.1:{port}/api/generate", json=body, timeout=60) as r:
                lines.extend(json.loads(line) for line in r.iter_lines() if line)
        t = threading.Thread(target=stream)
        t.start()
        wait_for(lambda: proc.poll() is None and _busy(port), 30, "the answer to start")
        proc.terminate()
        t.join(60)
        assert lines and lines[-1]["done"] is True, lines[-1:]  # the whole answer arrived
        assert proc.wait(30) == 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert main(["ps", "--port", str(port)]) == 1


def _busy(port: int) -> bool:
    """Whether the server's engine has a request running (from /metrics)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return any(line.startswith("deltarun_requests_running") and not line.rstrip().endswith(" 0")
               for line in text.splitlines())


def test_serve_parser(monkeypatch):
    from deltarun.cli import build_parser

    monkeypatch.delenv("DELTARUN_KEEP_ALIVE", raising=False)
    monkeypatch.delenv("DELTARUN_MAX_LOADED_MODELS", raising=False)
    args = build_parser().parse_args(["serve"])
    assert args.model is None and args.keep_alive == "5m" and args.max_loaded_models == 3
    args = build_parser().parse_args(["serve", "qwen3.5:2b", "--keep-alive", "-1", "--max-loaded-models", "1"])
    assert args.model == "qwen3.5:2b" and args.keep_alive == "-1" and args.max_loaded_models == 1
    monkeypatch.setenv("DELTARUN_KEEP_ALIVE", "1h")
    assert build_parser().parse_args(["serve"]).keep_alive == "1h"
