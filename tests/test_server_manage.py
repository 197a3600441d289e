"""Ollama's model management routes against a live server and a fake hub: the official `ollama` client's
pull / show / copy / delete, NDJSON progress lines on the wire, and errors as {"error": ...}."""
import json
import os
import sys

import httpx
import ollama
import pytest
import torch
from server_helpers import live_server

sys.path.insert(0, os.path.dirname(__file__))
from fake_hub import COMMIT, FakeHub  # noqa: E402
from test_models_cli import README, TEMPLATE, _ollama_model  # noqa: E402
from tiny import make_checkpoint, tiny_config  # noqa: E402

REPO = "Qwen/Qwen3.5-0.8B"


@pytest.fixture(scope="module")
def live(chat_ckpt):
    return live_server(chat_ckpt)


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    out = make_checkpoint(tmp_path_factory.mktemp("hubckpt") / "m", tiny_config(), dtype=torch.bfloat16)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    (out / "README.md").write_text(README)
    return out


@pytest.fixture
def machine(tmp_path, hub_files, monkeypatch):
    """The server process's stores in tmp, and HF_ENDPOINT at a fake hub (set in-process: the server is a thread)."""
    from huggingface_hub import constants

    fake = FakeHub({REPO: hub_files})
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("DELTARUN_HOME", str(tmp_path / "d"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    yield {"hub": fake, "cache": cache, "ollama": tmp_path / "ollama"}
    fake.close()


def test_pull_show_copy_delete_with_the_ollama_client(live, machine):
    client = ollama.Client(host=live.url)
    parts = list(client.pull("qwen3.5:0.8b", stream=True))
    assert parts[0].status == "pulling manifest" and parts[-1].status == "success"
    downloads = [p for p in parts if p.status and p.status.startswith("downloading ")]
    assert downloads and all(p.total and p.completed is not None and p.digest for p in downloads)
    assert downloads[-1].completed == downloads[-1].total > 100_000  # every byte of the repo
    assert all(a.completed <= b.completed for a, b in zip(downloads, downloads[1:]))
    snap = machine["cache"] / "models--Qwen--Qwen3.5-0.8B" / "snapshots" / COMMIT
    assert (snap / "config.json").is_file()

    show = client.show("qwen3.5:0.8b")  # not the served model: details from the store
    assert show.details.format == "safetensors" and show.details.quantization_level == "bfloat16"
    assert show.modelinfo["qwen35.context_length"] == 4096 and show.modelinfo["general.parameter_count"] > 0
    assert {"vision", "tools", "thinking"} <= set(show.capabilities)
    assert "apache-2.0" in show.license and "<|im_start|>" in show.template

    assert client.copy("qwen3.5:0.8b", "mine:latest").status == "success"
    assert client.show("mine:latest").modelinfo["qwen35.context_length"] == 4096
    assert client.delete("mine:latest").status == "success"  # only the name
    assert snap.exists()
    with pytest.raises(ollama.ResponseError) as e:
        client.show("mine:latest")
    assert e.value.status_code == 404

    assert client.delete("qwen3.5:0.8b").status == "success"
    assert not snap.exists()
    with pytest.raises(ollama.ResponseError) as e:
        client.show("qwen3.5:0.8b")
    assert e.value.status_code == 404 and "deltarun pull" in e.value.error


def test_pull_not_streamed_and_wire_format(live, machine):
    r = httpx.post(live.url + "/api/pull", json={"model": "qwen3.5:0.8b", "stream": False}, timeout=60)
    assert r.status_code == 200 and r.json() == {"status": "success"}
    with httpx.stream("POST", live.url + "/api/pull", json={"model": "qwen3.5:0.8b"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}


def test_pull_errors(live, machine):
    r = httpx.post(live.url + "/api/pull", json={"model": "qwen3:9b"}, timeout=30)
    assert r.status_code == 404 and "did you mean 'qwen3.5:9b'" in r.json()["error"]
    r = httpx.post(live.url + "/api/pull", json={"model": "qwen3.5:2b", "stream": False}, timeout=30)
    assert r.status_code == 404 and "not found" in r.json()["error"]  # the fake hub has only 0.8B
    with httpx.stream("POST", live.url + "/api/pull", json={"model": "qwen3.5:2b"}, timeout=30) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "error" in lines[-1] and "Qwen3.5-2B" in lines[-1]["error"]
    with pytest.raises(ollama.ResponseError):
        list(ollama.Client(host=live.url).pull("qwen3.5:2b", stream=True))


def test_pull_of_a_path_says_nothing_about_the_disk(live, machine, tmp_path):
    """A path given to /api/pull gets one 404 whether it exists or not ("is a local path" told that it did)."""
    answers = []
    for path in (str(tmp_path), str(tmp_path / "missing"), "./" + tmp_path.name, "~/nope"):
        r = httpx.post(live.url + "/api/pull", json={"model": path, "stream": False}, timeout=30)
        assert r.status_code == 404, r.text
        answers.append(r.json()["error"].replace(repr(path), "PATH"))
    assert len(set(answers)) == 1 and "never given by path" in answers[0]


def test_delete_refuses_other_tools_and_unknown(live, machine):
    blob = _ollama_model(machine["ollama"], "qwen3.5", "9b-q4_K_M", b"GGUF" + b"\0" * 100, "Q4_K_M")
    r = httpx.request("DELETE", live.url + "/api/delete", json={"model": "qwen3.5:9b-q4_K_M"}, timeout=30)
    assert r.status_code == 403 and "Ollama" in r.json()["error"] and blob.exists()
    r = httpx.request("DELETE", live.url + "/api/delete", json={"model": "nope:1b"}, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    show = ollama.Client(host=live.url).show("qwen3.5:9b-q4_K_M")
    assert show.details.format == "gguf" and show.details.quantization_level == "Q4_K_M"


def test_copy_errors(live, machine):
    r = httpx.post(live.url + "/api/copy", json={"source": "nope:1b", "destination": "x"}, timeout=30)
    assert r.status_code == 404
    _ollama_model(machine["ollama"], "qwen3.5", "9b-q4_K_M", b"GGUF" + b"\0" * 100, "Q4_K_M")
    r = httpx.post(live.url + "/api/copy", json={"source": "qwen3.5:9b-q4_K_M", "destination": "bad name"},
                   timeout=30)
    assert r.status_code == 400


def test_show_served_model_has_real_details(live):
    show = ollama.Client(host=live.url).show("tiny")
    info = show.modelinfo
    assert info["general.parameter_count"] > 0 and info["qwen35.context_length"] == 4096
    assert info["qwen35.linear_attention_layers"] == 3 and info["qwen35.full_attention_layers"] == 2
    assert show.details.quantization_level == "FLOAT32" and "tools" in show.capabilities


def test_ps_command(live, capsys):
    from deltarun.cli import main

    port = live.url.rsplit(":", 1)[1]
    assert main(["ps", "--port", port]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "CPU" in out and "forever" in out


def test_ps_without_server(capsys):
    import socket

    from deltarun.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["ps", "--port", str(port)]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and "no deltarun server answering" in err[0]


def test_pull_offline_is_a_clear_503(live, machine, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = httpx.post(live.url + "/api/pull", json={"model": "qwen3.5:0.8b"}, timeout=30)
    assert r.status_code == 503 and "needs the network" in r.json()["error"] and "HF_HUB_OFFLINE" in r.json()["error"]
    assert not machine["cache"].exists()  # nothing was written
