"""Shared fixtures: tiny random checkpoints (fp32) written once per test session; the network guard
(netguard/sitecustomize.py) and the environment that keeps tools from phoning home; the CPU kernels."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "netguard"))
# Tools that phone home by default, switched off here and in every process the tests start (a test that
# serves a fake hub on loopback sets HF_HUB_OFFLINE=0 and HF_ENDPOINT itself).
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
                   "RAY_USAGE_STATS_ENABLED": "0", "OPENAI_AGENTS_DISABLE_TRACING": "1",
                   "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"})
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The network guard, here and (as sitecustomize on PYTHONPATH) in every Python subprocess.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE / "netguard"), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("DELTARUN_NETGUARD_LOG", str(Path(tempfile.mkdtemp(prefix="deltarun-netguard-")) / "log"))
import sitecustomize as netguard  # noqa: E402 (tests/netguard/sitecustomize.py)

netguard.install()
# one build of the CPU decode kernels for the session, whatever HOME a test gives its subprocesses
os.environ.setdefault("DELTARUN_KERNELS_DIR", str(Path.home() / ".cache" / "deltarun" / "kernels"))

from cpu_kernels import require_cpu_kernels  # noqa: E402
from tiny import VARIANTS, make_checkpoint, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _ops_settings():
    """Every test starts from the DELTARUN_* switches of the environment it runs in (ops/settings.py reads them
    once per process; a test that changes one re-reads them itself), and leaves them so."""
    from deltarun.ops.settings import reload

    reload()
    yield
    reload()


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, tiny_config(**ov), seed=i)
            for i, (name, ov) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ckpts) -> Path:
    return tiny_ckpts["hybrid"]


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory) -> Path:
    """A tiny model with the real vocabulary size, tokenizer files and the 0.8B/2B chat template."""
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "m", tiny_config(vocab_size=248320), seed=5,
                           tokenizer=True)


@pytest.fixture(scope="session")
def chat_llm(chat_ckpt):
    from deltarun import LLM

    return LLM(str(chat_ckpt), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def real_08b_ckpt(tmp_path_factory) -> Path:
    """The official Qwen3.5-0.8B layout and shapes, random weights (bf16 on disk, ~1.7 GB), written once."""
    from deltarun.weights.random_init import write_random_checkpoint

    return write_random_checkpoint("0.8B", tmp_path_factory.mktemp("real") / "q08", seed=1, tokenizer=False)


@pytest.fixture(scope="session")
def hf_ref(chat_ckpt):
    """transformers' Qwen3_5ForConditionalGeneration on the chat checkpoint (the vision reference), fp32."""
    import torch
    from transformers import Qwen3_5ForConditionalGeneration

    return Qwen3_5ForConditionalGeneration.from_pretrained(chat_ckpt, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def _network_guard(request):
    """Fails the test during which any process of the suite tried to reach a non-loopback address."""
    log = Path(os.environ["DELTARUN_NETGUARD_LOG"])
    start = log.stat().st_size if log.exists() else 0
    yield
    if request.node.get_closest_marker("netguard_expected"):
        return
    if log.exists() and log.stat().st_size > start:
        with log.open() as f:
            f.seek(start)
            pytest.fail("\n".join(["network access outside loopback:", *f.read().splitlines()[:20]]), pytrace=False)


@pytest.fixture(scope="session")
def cpu_kernels() -> None:
    """The CPU kernels (ops/csrc), built for this machine (cpu_kernels.py: skip without a compiler, fail on
    a failed build)."""
    require_cpu_kernels()
