"""Faults (issue 20): kill -9 in the middle of a pull, a quantize and a copy leaves nothing half-written (the
next look at the store sees no model or a whole one); an exception inside one batched engine step fails
only that step's requests, in each API's error shape, and the engine keeps serving with no slot leaked;
a model folder deleted while it is loaded neither crashes the server nor stays listed.

"Mid-way" is made deterministic: the killed process runs the real command with one function wrapped to
print PAUSED and sleep at the chosen point (or, for a pull, the fake hub stalls in the middle of a shard).
"""
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from tiny import make_checkpoint, tiny_config

from deltarun import atomic
from deltarun.store import names

REPO = "Qwen/Qwen3.5-0.8B"
PAUSE = "import time\ndef pause():\n    print('PAUSED', flush=True)\n    time.sleep(600)\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "m", tiny_config(), dtype=torch.bfloat16,
                           shard_bytes=200_000)  # several shards: a pull can stop between them


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """Empty stores for this test, here and in the processes it starts (they inherit os.environ)."""
    from deltarun.ops.settings import reload

    for key, sub in (("DELTARUN_HOME", "d"), ("HF_HUB_CACHE", "hf/hub"), ("HF_HOME", "hf"), ("OLLAMA_MODELS", "o")):
        monkeypatch.setenv(key, str(tmp_path / sub))
    monkeypatch.setenv("DELTARUN_CPU_KERNELS", "0")  # torch's ops: loading checks the files, not the kernels
    reload()
    (tmp_path / "d").mkdir()
    return tmp_path / "d"


def _killed_at_pause(code: str, env: dict | None = None) -> None:
    """Run `code` in a fresh Python, wait until it prints PAUSED, then kill -9 it."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],  # type: ignore
                     daemon=True).start()
    seen = []
    try:
        while (line := lines.get(timeout=90)) is not None and line.strip() != "PAUSED":
            seen.append(line)
        assert line is not None, "the process ended without pausing:\n" + "".join(seen)
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait(30)


def _listed() -> list[str]:
    from deltarun.store.listing import alias_models, list_models

    return [m.name for m in list_models() + alias_models()]


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if atomic.is_temp(p.name)]


# ------------------------------------------------------------------------------------------------ pull

def test_kill_during_pull_lists_nothing_then_the_next_pull_finishes(home, ckpt):
    from deltarun.store.listing import find_local
    from deltarun.store.resolve import resolve_model

    hub = FakeHub({REPO: ckpt})
    try:
        shard = sorted(p.name for p in ckpt.glob("*.safetensors"))[-1]
        hub.stall.add(shard)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        proc = subprocess.Popen([sys.executable, "-m", "deltarun.cli", "pull", "qwen3.5:0.8b"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        snap = Path(os.environ["HF_HUB_CACHE"]) / "models--Qwen--Qwen3.5-0.8B" / "snapshots"
        try:
            assert hub.stalled.wait(60), "the pull never reached the shard"
            for _ in range(500):  # the small files come in parallel: wait for the config, the dangerous case
                if list(snap.glob("*/config.json")):
                    break
                threading.Event().wait(0.02)
        finally:
            proc.kill()
            proc.wait(30)
        [folder] = snap.iterdir()
        assert (folder / "config.json").is_file() and not (folder / shard).exists()  # really half a model
        assert "qwen3.5:0.8b" not in _listed()
        with pytest.raises(names.ModelNotFound, match="not downloaded"):
            find_local("qwen3.5:0.8b")
        with pytest.raises(names.ModelNotFound):
            resolve_model("qwen3.5:0.8b", download=False)
        hub.stall.clear()
        r = subprocess.run([sys.executable, "-m", "deltarun.cli", "pull", "qwen3.5:0.8b"], env=env,
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr
    finally:
        hub.close()
    model = find_local("qwen3.5:0.8b")
    assert all((model.path / f.name).read_bytes() == f.read_bytes() for f in ckpt.iterdir())
    assert resolve_model("qwen3.5:0.8b", download=False) == model.path


# -------------------------------------------------------------------------------------------- quantize

def _quantize_code(src: Path, out: Path, bits: int, patch: str) -> str:
    return (PAUSE + patch + "from deltarun.cli import main\n"
            f"raise SystemExit(main(['quantize', {str(src)!r}, {str(out)!r}, '--bits', '{bits}']))\n")


def _whole(out: Path, bits: int) -> None:
    from deltarun.weights.loader import load_model

    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == bits
    load_model(out, dtype="float32", device="cpu")  # every tensor there


def test_kill_during_quantize_leaves_no_folder_and_the_next_run_sweeps(home, ckpt):
    from deltarun.weights.quantize import QuantSpec, save_quantized

    out = home / "tiny-int8"
    _killed_at_pause(_quantize_code(ckpt, out, 8, (
        "import deltarun.weights.quantize as q\nreal = q.save_file\n"
        "def save_file(*a, **k):\n    real(*a, **k)\n    pause()\nq.save_file = save_file\n")))
    assert not out.exists() and "tiny-int8" not in _listed()
    assert _temps(home), "the weights were written somewhere before the kill"
    save_quantized(ckpt, out, QuantSpec(8))
    assert not _temps(home)  # the dead run's leftover is swept
    assert "tiny-int8" in _listed()
    _whole(out, 8)


def test_kill_while_replacing_a_quantized_folder_keeps_a_whole_one(home, ckpt):
    """Quantizing over an existing folder: killed while the old one is being deleted, the name still holds
    a whole model (it used to be deleted in place: config.json left, weights gone, and still listed)."""
    from deltarun.weights.quantize import QuantSpec, save_quantized

    out = home / "tiny-q"
    save_quantized(ckpt, out, QuantSpec(8))
    _killed_at_pause(_quantize_code(ckpt, out, 4, (
        "import shutil\nfrom pathlib import Path\nreal = shutil.rmtree\n"
        "def rmtree(path, *a, **k):\n    w = Path(path) / 'model.safetensors'\n"
        "    if w.exists():\n        w.unlink()\n        pause()\n    return real(path, *a, **k)\n"
        "shutil.rmtree = rmtree\n")))
    assert "tiny-q" in _listed()
    _whole(out, 4)  # the new one, already in place when the old one was being deleted
    assert _temps(home) and atomic.sweep(home) and not _temps(home)


def test_kill_during_init_random_leaves_no_folder(home, tmp_path):
    """`deltarun init-random` wrote config.json first, then the shards: killed midway, a listed half model."""
    cfg, out = tmp_path / "cfg.json", home / "rand"
    cfg.write_text(json.dumps(tiny_config()))
    _killed_at_pause(PAUSE + "import deltarun.weights.random_init as r\nreal = r.save_file\n"
                     "def save_file(*a, **k):\n    real(*a, **k)\n    pause()\nr.save_file = save_file\n"
                     f"from deltarun.cli import main\nmain(['init-random', {str(cfg)!r}, {str(out)!r}])\n")
    assert not out.exists() and "rand" not in _listed() and _temps(home)


# ------------------------------------------------------------------------------------------------ copy

def test_kill_during_copy_keeps_the_old_table(home, ckpt):
    """`/api/copy` records the new name in aliases.json (store/operations.add_alias); killed after the new
    table is written but before it replaces the old one, the old table stands whole."""
    from deltarun.store.aliases import aliases
    from deltarun.store.operations import add_alias

    shutil.copytree(ckpt, home / "base")
    add_alias("base", "first")
    _killed_at_pause(PAUSE + "import os\nos.fsync = lambda fd: pause()\n"
                     "from deltarun.store.operations import add_alias\nadd_alias('base', 'second')\n")
    assert set(aliases()) == {"first"} and "second" not in _listed() and "first" in _listed()
    assert _temps(home)  # the new table was written, under a temp name
    add_alias("base", "third")
    assert set(aliases()) == {"first", "third"} and not _temps(home)
