"""`deltarun list | show | pull | rm` run as a user runs them, against a fake HF cache, Ollama store and
deltarun folder built in tmp (no network: pulls must fail clearly)."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import make_checkpoint, tiny_config  # noqa: E402

TEMPLATE = ("{%- if tools %}<tools>{{ tools }}</tools>{%- endif %}\n"
            "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}\n"
            "{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n{%- endif %}\n")
README = ("---\nlicense: apache-2.0\nlicense_link: https://huggingface.co/Qwen/Qwen3.5-0.8B/blob/main/LICENSE\n"
          "---\n# x\n")
COMMIT = "a" * 40


def _hf_repo(hub_dir: Path, repo: str, src: Path) -> Path:
    """Put the files of `src` into the HF cache layout: blobs/<sha>, snapshots/<commit>/name → blob, refs/main."""
    root = hub_dir / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def _ollama_model(models: Path, name: str, tag: str, payload: bytes, file_type: str) -> Path:
    blobs = models / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(payload).hexdigest()
    (blobs / f"sha256-{digest}").write_bytes(payload)
    cfg = json.dumps({"model_format": "gguf", "model_family": "qwen35", "file_type": file_type}).encode()
    cfg_digest = hashlib.sha256(cfg).hexdigest()
    (blobs / f"sha256-{cfg_digest}").write_bytes(cfg)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": f"sha256:{cfg_digest}", "size": len(cfg)},
                "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                            "size": len(payload)}]}
    path = models / "manifests" / "registry.ollama.ai" / "library" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blobs / f"sha256-{digest}"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", tiny_config(), dtype=torch.bfloat16)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    (out / "README.md").write_text(README)
    return out


@pytest.fixture
def stores(tmp_path, tiny_ckpt):
    """A fake machine: HF cache with a Qwen3.5 repo and a non-Qwen one, an Ollama store, deltarun's folder."""
    hub_dir = tmp_path / "hf" / "hub"
    snap = _hf_repo(hub_dir, "Qwen/Qwen3.5-0.8B", tiny_ckpt)
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _hf_repo(hub_dir, "meta/Llama-Tiny", other)
    ollama = tmp_path / "ollama"
    blob = _ollama_model(ollama, "qwen3.5", "9b-q4_K_M", b"GGUF" + b"\0" * 2000, "Q4_K_M")
    _ollama_model(ollama, "llama3", "8b", b"GGUF" + b"\1" * 100, "Q4_0")
    deltarun_home = tmp_path / "deltarun"
    shutil.copytree(tiny_ckpt, deltarun_home / "my-conversion")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(hub_dir), "HOME": str(tmp_path),
           "OLLAMA_MODELS": str(ollama), "DELTARUN_HOME": str(deltarun_home), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return {"env": env, "snap": snap, "hub": hub_dir, "blob": blob, "ollama": ollama, "deltarun": deltarun_home}


def run(env, *args, stdin=""):
    return subprocess.run([sys.executable, "-m", "deltarun.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=env)


def one_line_error(r, needle):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_list_finds_all_three_stores(stores):
    r = run(stores["env"], "list")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
    assert set(rows) == {"qwen3.5:0.8b", "qwen3.5:9b-q4_K_M", "my-conversion"}, r.stdout  # no llama
    assert "bfloat16" in rows["qwen3.5:0.8b"] and "HF cache" in rows["qwen3.5:0.8b"]
    assert "Q4_K_M" in rows["qwen3.5:9b-q4_K_M"] and "Ollama store" in rows["qwen3.5:9b-q4_K_M"]
    assert "(GGUF)" in rows["qwen3.5:9b-q4_K_M"]
    assert "deltarun" in rows["my-conversion"]


def test_list_empty_machine(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "HOME": str(tmp_path), "OLLAMA_MODELS": str(tmp_path / "o"), "DELTARUN_HOME": str(tmp_path / "d")}
    r = run(env, "list")
    assert r.returncode == 0 and "no Qwen3.5 models found" in r.stdout, r.stderr


def test_show_hf_model(stores):
    from deltarun.config import ModelConfig
    from deltarun.weights.random_init import tensor_shapes

    r = run(stores["env"], "show", "qwen3.5:0.8b")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Qwen3_5ForConditionalGeneration" in out and "Qwen/Qwen3.5-0.8B" in out
    shapes = tensor_shapes(ModelConfig.from_file(stores["snap"] / "config.json"))
    total = sum(torch.Size(s).numel() for s in shapes.values())
    from deltarun.store.info import _count
    assert f"{_count(total)} total" in out
    caps = next(line for line in out.splitlines() if line.startswith("capabilities"))
    assert "vision" in caps and "tools" in caps and "thinking" in caps
    assert "apache-2.0" in out and "4096" in out and "<|im_start|>" in out
    assert "3 Gated DeltaNet, 2 full attention" in out
    # the same model by snapshot folder
    assert run(stores["env"], "show", str(stores["snap"])).returncode == 0


def test_show_ollama_gguf(stores):
    r = run(stores["env"], "show", "qwen3.5:9b-q4_K_M")
    assert r.returncode == 0, r.stderr
    assert "GGUF" in r.stdout and "Q4_K_M" in r.stdout and "in place, read-only" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["show", "qwen3.5:8b"], "did you mean 'qwen3.5:0.8b' or 'qwen3.5:9b'"),
    (["show", "qwen3.5:2b"], "deltarun pull qwen3.5:2b"),
    (["show", "qwen3.5:2b-int4"], "deltarun pull qwen3.5:2b"),
    (["show", "qwen3.5:2b-q4_k_m"], "no GGUF 'q4_k_m' file"),
    (["pull", "qwen3:9b"], "did you mean 'qwen3.5:9b'"),
    (["pull", "qwen3.5:9b-q4_k_m"], "ollama pull qwen3.5:9b-q4_k_m"),
    (["pull", "qwen3.5:9b-int4"], "pulling Qwen/Qwen3.5-9B needs the network"),  # int4: the full model
    (["pull", "qwen3.5:0.8b"], "needs the network"),
    (["rm", "qwen3.5:4b"], "not downloaded"),
    (["generate", "qwen3.5:9b-int4", "hi"], "Qwen/Qwen3.5-9B is not in the local Hugging Face cache"),
])
def test_bad_names_are_one_line_errors(stores, args, needle, monkeypatch, capsys):
    """In-process (`cli.main`, same code path as the subprocess runs above) to keep the suite fast."""
    from deltarun.cli import main

    for k in ("HF_HUB_CACHE", "OLLAMA_MODELS", "DELTARUN_HOME", "HF_HUB_OFFLINE", "HOME"):
        monkeypatch.setenv(k, stores["env"][k])
    rc = main(args)
    err = capsys.readouterr().err
    one_line_error(subprocess.CompletedProcess(args, rc, "", err), needle)


def test_pull_unreachable_hub_is_clear(stores):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**stores["env"], "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    r = run(env, "pull", "qwen3.5:2b")
    one_line_error(r, "could not download Qwen/Qwen3.5-2B")
    assert "resumes" in r.stderr


def test_rm_hf_asks_then_deletes(stores):
    env = stores["env"]
    r = run(env, "rm", "qwen3.5:0.8b", stdin="n\n")
    assert r.returncode == 1 and "not deleted" in r.stderr and stores["snap"].exists()
    r = run(env, "rm", "qwen3.5:0.8b", stdin="y\n")
    assert r.returncode == 0 and "deleted qwen3.5:0.8b" in r.stdout, r.stderr
    assert not (stores["hub"] / "models--Qwen--Qwen3.5-0.8B").exists()
    # the rest of the cache is untouched
    assert (stores["hub"] / "models--meta--Llama-Tiny").exists(), (r.stdout, list(stores["hub"].iterdir()))
    assert "qwen3.5:0.8b" not in run(env, "list").stdout


def test_rm_deltarun_folder_with_yes(stores):
    r = run(stores["env"], "rm", "my-conversion", "--yes")
    assert r.returncode == 0, r.stderr
    assert not (stores["deltarun"] / "my-conversion").exists()


def test_rm_refuses_other_tools_files_without_force(stores, tiny_ckpt):
    env = stores["env"]
    one_line_error(run(env, "rm", "qwen3.5:9b-q4_K_M", "--yes"), "Ollama")
    assert stores["blob"].exists()
    one_line_error(run(env, "rm", str(tiny_ckpt), "--yes"), "outside the caches")
    assert tiny_ckpt.exists()
    r = run(env, "rm", "qwen3.5:9b-q4_K_M", "--yes", "--force")
    assert r.returncode == 0, r.stderr
    assert not stores["blob"].exists()
    assert (stores["ollama"] / "manifests/registry.ollama.ai/library/llama3/8b").exists()


def test_copied_names_are_listed_and_removed_alone(stores, monkeypatch, capsys):
    """Names made with /api/copy (`ollama cp`): listed as copies; `rm` of one removes only the name, and
    removing the model removes the names that pointed at it. (In-process `cli.main`: fast.)"""
    from deltarun.cli import main

    for k in ("HF_HUB_CACHE", "OLLAMA_MODELS", "DELTARUN_HOME", "HF_HUB_OFFLINE", "HOME", "COLUMNS"):
        monkeypatch.setenv(k, stores["env"][k])

    def cli(*args) -> str:
        assert main(list(args)) == 0
        return capsys.readouterr().out
    (stores["deltarun"] / "aliases.json").write_text(json.dumps({"mine:latest": "qwen3.5:0.8b", "gone": "nope:1b"}))
    rows = {line.split()[0]: line for line in cli("list").splitlines() if line.strip()}
    assert "copy of qwen3.5:0.8b" in rows["mine:latest"] and "gone" not in rows  # a name whose model is gone
    assert "4096" in cli("show", "mine")  # Ollama's names: "mine" is "mine:latest"
    assert "deleted the name mine:latest (qwen3.5:0.8b stays)" in cli("rm", "mine")
    assert stores["snap"].exists() and "mine:latest" not in cli("list")
    (stores["deltarun"] / "aliases.json").write_text(json.dumps({"mine": "qwen3.5:0.8b", "q": "qwen3.5:0.8b-int4"}))
    assert "also the names mine, q" in cli("rm", "qwen3.5:0.8b", "--yes")
    assert json.loads((stores["deltarun"] / "aliases.json").read_text()) == {}
