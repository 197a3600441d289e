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
    from deltarun.store import pull

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


def test_full_disk_is_one_clear_line_and_leaves_nothing(env, fake_hub, hub_files, monkeypatch, capsys):
    """The disk fills up halfway through a shard (a write raises ENOSPC): one line saying so, and no
    partial file in the cache (in-process, so the write can be made to fail)."""
    import errno

    from huggingface_hub import constants, file_download

    from deltarun.cli import main

    for k in ("HF_HUB_CACHE", "OLLAMA_MODELS", "DELTARUN_HOME", "HF_HUB_OFFLINE", "HOME"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # several writes per shard
    shard = _shard(hub_files)
    written = []

    class FullDisk:
        """The download's temp file on a disk with 20 KB left."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            if sum(written) + len(data) > 20_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(len(data))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_get = file_download.http_get
    monkeypatch.setattr(file_download, "http_get", lambda url, temp_file, **kw: real_get(
        url, FullDisk(temp_file) if url.endswith("/" + shard) else temp_file, **kw))
    assert main(["pull", "qwen3.5:0.8b"]) == 1
    # (the fake hub, a thread of this process, also logs the connection the client dropped: left out)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deltarun")]
    assert len(err) == 1 and "not enough disk space to download Qwen/Qwen3.5-0.8B" in err[0], err
    assert "No space left on device" in err[0] and sum(written) > 0  # it failed mid-file
    blobs = _snapshot(env).parent.parent / "blobs"
    assert not [p for p in blobs.iterdir() if p.name.endswith(".incomplete")]
    assert not (_snapshot(env) / shard).exists()
    assert all(hub_files.joinpath(p.name).read_bytes() == p.read_bytes() for p in _snapshot(env).iterdir())
