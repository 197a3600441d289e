"""`deltarun serve MODEL --lora-modules NAME=FOLDER …`, run as a user runs it (a subprocess), driven by the
official `openai`, `ollama` and `anthropic` clients: a request naming an adapter as its model runs the base
with that adapter, and equals the Python API's run with the same `LoRARequest` (itself checked against
transformers + peft in tests/test_lora*.py); requests for different adapters and the base, sent at once, are
batched and each equals its run alone; adapters are listed with their base as parent; an unknown one is a 404;
a bad adapter folder, or a name a model already has, stops the start with one line.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import ollama
import openai
import pytest
from lora_helpers import make_adapter

from deltarun import LLM, LoRARequest, SamplingParams

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPTS = ["The weather today", "Write SQL for", "Section 2 of the act"]


@pytest.fixture(scope="module")
def loras(chat_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-loras")
    _, sql = make_adapter(chat_ckpt, False, root / "sql", seed=21, r=8, lora_alpha=32,
                          target_modules=ATTN + ["gate_proj", "in_proj_qkv"])
    _, law = make_adapter(chat_ckpt, False, root / "law", seed=22, r=4, lora_alpha=16,
                          target_modules=["down_proj", "out_proj", "in_proj_z"])
    return {"sql": str(sql), "law": str(law)}


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "DELTARUN_HOME": str(tmp_path / "h"),
            "HF_HUB_CACHE": str(tmp_path / "hf"), "OLLAMA_MODELS": str(tmp_path / "o")}


def _serve(*args, env):
    return subprocess.Popen([sys.executable, "-m", "deltarun.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def server(chat_ckpt, loras, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _serve(str(chat_ckpt), "--served-model-name", "tiny", "--dtype", "float32", "--port", str(port),
                  "--lora-modules", f"sql={loras['sql']}", '{"name": "law", "path": "%s"}' % loras["law"],
                  "--max-loras", "2", env=_env(tmp_path_factory.mktemp("serve")))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/api/version", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local(chat_ckpt):
    return LLM(str(chat_ckpt), dtype="float32", device="cpu")


def _expected(local, loras, name, prompt, n=8):
    lora = LoRARequest(name, 1, loras[name]) if name in loras else None
    return local.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                          lora_request=lora)[0].outputs[0].text


def test_clients_select_adapters_by_model_name(server, local, loras):
    oa = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    ol = ollama.Client(host=server)
    texts = {}
    for name in ("sql", "law", "tiny"):
        got = oa.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
        assert got.model == name
        texts[name] = got.choices[0].text
        assert texts[name] == _expected(local, loras, name, PROMPTS[0])
        r = ol.generate(model=name, prompt=PROMPTS[0], raw=True,
                        options={"temperature": 0, "num_predict": 8})
        assert r.response == texts[name]
    assert len(set(texts.values())) == 3  # each adapter really changes the answer
    chat = oa.chat.completions.create(model="law", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "law" and chat.choices[0].finish_reason in ("length", "stop")
    msg = anthropic.Anthropic(base_url=server, api_key="x", max_retries=0).messages.create(
        model="sql", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert msg.model == "sql"


def test_mixed_adapters_at_once(server, local, loras):
    """Requests for two adapters and the base, concurrently (--max-loras 2): each equals its run alone."""
    oa = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    jobs = [(name, p) for p in PROMPTS for name in ("sql", "tiny", "law")]

    def one(job):
        name, prompt = job
        return oa.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    assert got == [_expected(local, loras, name, p) for name, p in jobs]


def test_adapters_are_listed_with_their_base(server):
    oa = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    cards = {m.id: m for m in oa.models.list().data}
    assert {"tiny", "sql", "law"} <= set(cards)
    assert cards["sql"].model_extra["parent"] == "tiny" and cards["law"].model_extra["parent"] == "tiny"
    assert cards["sql"].model_extra["root"] == "sql"  # never the adapter's folder
    assert oa.models.retrieve("law").model_extra["parent"] == "tiny"
    tags = {m.model: m for m in ollama.Client(host=server).list().models}
    assert tags["sql"].details.parent_model == "tiny" and tags["tiny"].details.parent_model == ""
    assert ollama.Client(host=server).show("law").details.parent_model == "tiny"


def test_unknown_adapter_is_a_404(server):
    oa = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="sql2", prompt="x", max_tokens=2)
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server).generate(model="nope", prompt="x")
    assert e.value.status_code == 404


@pytest.mark.parametrize("case", ["bad_folder", "collision", "no_model", "bad_spec"])
def test_bad_adapters_stop_the_start_with_one_line(case, chat_ckpt, loras, tmp_path):
    args = {"bad_folder": [str(chat_ckpt), "--lora-modules", f"x={tmp_path}"],
            "collision": [str(chat_ckpt), "--served-model-name", "tiny", "--lora-modules", f"tiny={loras['sql']}"],
            "no_model": ["--lora-modules", f"x={loras['sql']}"],
            "bad_spec": [str(chat_ckpt), "--lora-modules", "x"]}[case]
    proc = _serve(*args, "--dtype", "float32", "--port", "1", env=_env(tmp_path))
    out, errs = proc.communicate(timeout=120)
    assert proc.returncode == 1
    lines = [line for line in errs.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in errs, errs
    assert {"bad_folder": "adapter_config.json", "collision": "already a model", "no_model": "needs the MODEL",
            "bad_spec": "NAME=FOLDER"}[case] in lines[0]


def test_cli_generate_with_an_adapter(chat_ckpt, local, loras, tmp_path):
    r = subprocess.run([sys.executable, "-m", "deltarun.cli", "generate", str(chat_ckpt), PROMPTS[1], "--raw",
                        "--dtype", "float32", "--temperature", "0", "--max-tokens", "8", "--lora", loras["law"]],
                       capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    want = local.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8),
                          lora_request=LoRARequest("law", 1, loras["law"]))[0].outputs[0].text
    assert r.stdout == want + "\n"
    assert want != local.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
