"""`deltarun pull` against a fake Hugging Face hub (tests/fake_hub.py) with HF_ENDPOINT pointed at it:
a clean pull lands in the HF cache and shows in `deltarun list`; a dropped connection is resumed
(HTTP Range inside one pull, finished files kept across pulls); a corrupt file is caught by checksum."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from fake_hub import COMMIT, FakeHub  # noqa: E402
from test_models_cli import README, TEMPLATE, one_line_error, run  # noqa: E402
from tiny import make_checkpoint, tiny_config  # noqa: E402

REPO = "Qwen/Qwen3.5-0.8B"


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    out = make_checkpoint(tmp_path_factory.mktemp("hubckpt") / "m", tiny_config(), dtype=torch.bfloat16,
                          shard_bytes=200_000)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    (out / "README.md").write_text(README)
    return out


@pytest.fixture
def fake_hub(hub_files):
    hub = FakeHub({REPO: hub_files})
    yield hub
    hub.close()


@pytest.fixture
def env(tmp_path, fake_hub):
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
            "HOME": str(tmp_path), "OLLAMA_MODELS": str(tmp_path / "ollama"), "DELTARUN_HOME": str(tmp_path / "d"),
            "HF_ENDPOINT": fake_hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}


def _snapshot(env):
    from pathlib import Path

    return Path(env["HF_HUB_CACHE"]) / "models--Qwen--Qwen3.5-0.8B" / "snapshots" / COMMIT


def _shard(hub_files):
    return sorted(p.name for p in hub_files.glob("*.safetensors"))[0]


def test_pull_lands_in_cache_and_lists(env, hub_files):
    r = run(env, "pull", "qwen3.5:0.8b")
    assert r.returncode == 0, r.stderr
    assert "checksums verified" in r.stdout
    snap = _snapshot(env)
    for f in hub_files.iterdir():
        assert (snap / f.name).read_bytes() == f.read_bytes(), f.name
    rows = [line for line in run(env, "list").stdout.splitlines() if line.startswith("qwen3.5:0.8b")]
    assert rows and "HF cache" in rows[0] and "bfloat16" in rows[0]
    assert run(env, "show", "qwen3.5:0.8b").returncode == 0


def test_dropped_connection_resumes_inside_one_pull(env, fake_hub, hub_files):
    """huggingface_hub retries a dropped body with `Range: bytes=<received>-` (for bytes it has already
    written: it reads DOWNLOAD_CHUNK_SIZE = 10 MB at a time, made small here so a tiny shard has chunks)."""
    import subprocess

    shard = _shard(hub_files)
    fake_hub.drop_once.add(shard)
    code = ("import sys, huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 4096; "
            "from deltarun.cli import main; sys.exit(main(['pull', 'qwen3.5:0.8b']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    ranges = fake_hub.gets(shard)
    assert ranges[0] is None and ranges[1] and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-", ranges
    assert (_snapshot(env) / shard).read_bytes() == (hub_files / shard).read_bytes()


def test_failed_pull_keeps_finished_files_and_the_next_pull_resumes(env, fake_hub, hub_files):
    shard = _shard(hub_files)
    fake_hub.drop_always.add(shard)
    r = run(env, "pull", "qwen3.5:0.8b")
    one_line_error(r, "could not download Qwen/Qwen3.5-0.8B")
    assert "resumes" in r.stderr
    snap = _snapshot(env)
    assert (snap / "config.json").exists() and not (snap / shard).exists()
    blobs = snap.parent.parent / "blobs"
    assert not list(blobs.glob("*.incomplete"))  # nothing half-written left behind
    fake_hub.drop_always.clear()
    fake_hub.requests.clear()
    r = run(env, "pull", "qwen3.5:0.8b")
    assert r.returncode == 0, r.stderr
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in fake_hub.requests if m == "GET" and "/resolve/" in p}
    assert fetched == {shard}, fetched  # only what was missing
    assert (snap / shard).read_bytes() == (hub_files / shard).read_bytes()


def test_corrupt_file_is_detected_by_checksum(env, fake_hub, hub_files):
    """huggingface_hub itself only checks sizes; deltarun hashes each blob against its ETag name."""
    shard = _shard(hub_files)
    fake_hub.corrupt.add(shard)
    r = run(env, "pull", "qwen3.5:0.8b")
    one_line_error(r, "failed the checksum twice")
    assert len(fake_hub.gets(shard)) == 2  # fetched again once
    assert not (_snapshot(env) / shard).exists()  # the corrupt file is not left in the cache


def test_corrupt_once_is_refetched(env, fake_hub, hub_files, monkeypatch):
    from deltarun.weights import pull

    shard = _shard(hub_files)
    monkeypatch.setenv("HF_HUB_CACHE", env["HF_HUB_CACHE"])
    r = run(env, "pull", "qwen3.5:0.8b")
    assert r.returncode == 0, r.stderr
    blob = (_snapshot(env) / shard).resolve()
    blob.write_bytes(b"\0" + blob.read_bytes()[1:])  # bit rot after the download
    bad = pull.verify(_snapshot(env))
    assert [p.name for p in bad] == [shard] and not blob.exists()
    r = run(env, "pull", "qwen3.5:0.8b")
    assert r.returncode == 0, r.stderr
    assert (_snapshot(env) / shard).read_bytes() == (hub_files / shard).read_bytes()


def test_unknown_repo_on_hub(env):
    one_line_error(run(env, "pull", "Qwen/Qwen3.5-0.8B-Nope"), "not found")
