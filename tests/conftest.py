"""Shared fixtures: tiny random checkpoints (fp32) written once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# one build of the CPU decode kernels for the session, whatever HOME a test gives its subprocesses
os.environ.setdefault("DELTARUN_KERNELS_DIR", str(Path.home() / ".cache" / "deltarun" / "kernels"))

from tiny import VARIANTS, make_checkpoint, tiny_config  # noqa: E402


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
