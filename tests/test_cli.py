"""The command line, run as a user runs it (a subprocess): outputs, exit codes, one-line errors."""
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def run(*args, stdin=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "deltarun.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env or ENV)


def test_generate_raw_matches_api(chat_ckpt, chat_llm):
    from deltarun import SamplingParams

    r = run("generate", str(chat_ckpt), "Hello", "--raw", "--dtype", "float32", "--temperature", "0",
            "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    expected = chat_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert r.stdout == expected + "\n"


def test_generate_chat_streams_answer(chat_ckpt, chat_llm):
    from deltarun import SamplingParams

    r = run("generate", str(chat_ckpt), "-", "--dtype", "float32", "--temperature", "0", "--max-tokens", "10",
            "--no-think", stdin="Hi there")
    assert r.returncode == 0, r.stderr
    expected = chat_llm.chat([{"role": "user", "content": "Hi there"}], SamplingParams(temperature=0, max_tokens=10),
                             enable_thinking=False)
    assert r.stdout == expected.content + "\n"


@pytest.mark.parametrize("args,needle", [
    (["generate", "/no/such/folder", "hi"], "no model folder"),
    (["generate", "qwen3.5:0.8b", "hi"], "deltarun chat demo"),
    (["generate", "qwen3.5:0.8b", "hi", "--temperature", "-2"], "temperature"),
    (["init-random", "7B", "/tmp/x"], "neither a bundled name"),
])
def test_bad_input_is_one_line_error(args, needle, tmp_path):
    env = {**ENV, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    r = run(*args, env=env)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_bad_checkpoint_is_one_line_error(chat_ckpt, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = run("generate", str(tmp_path), "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not a Qwen3.5 model" in r.stderr


def test_init_random_and_chat_repl(tmp_path):
    cfg = tmp_path / "cfg.json"
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import tiny_config

    cfg.write_text(json.dumps(tiny_config(vocab_size=248320)))
    out = tmp_path / "model"
    r = run("init-random", str(cfg), str(out))
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (out / name).exists()
    script = "/help\n/think on\nHello\n/think off\n\"\"\"two\nlines\"\"\"\n/clear\n/bogus\n/exit\n"
    r = run("chat", str(out), "--dtype", "float32", "--max-tokens", "5", "--temperature", "0", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "thinking on" in r.stdout and "thinking off" in r.stdout and "conversation cleared" in r.stdout
    assert "unknown command" in r.stdout and "Traceback" not in r.stderr
