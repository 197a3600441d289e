"""Load the multi-token-prediction head (`mtp.*` tensors) of a Hugging Face Qwen3.5 model folder.

Separate from the text loader (which skips `mtp.*`): the head is only needed for speculative decoding.
Built on the meta device and filled tensor by tensor in the model's dtype, like the vision tower.
A checkpoint without `mtp.*` tensors (or whose config declares no MTP layer) yields None.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ConfigError, ModelConfig
from ..model.mtp import MTPHead
from ..ops import routes
from .common import FP32_PARAMS, LoadError, adopt_tensors, resolve_device, resolve_dtype, weight_files

PREFIX = "mtp."


def has_mtp_tensors(folder: Path) -> bool:
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if any(k.startswith(PREFIX) for k in f.keys()):
                return True
    return False


def load_mtp(folder: str | Path, dtype: str | torch.dtype | None = "auto",
             device: str | torch.device | None = "auto") -> MTPHead | None:
    """The MTP head of `folder`, or None when the checkpoint has none."""
    folder = Path(folder)
    if (folder / "gguf.json").is_file():
        return None  # a GGUF sidecar: its `nextn` tensors are not read yet
    try:
        config = ModelConfig.from_file(folder / "config.json")
    except ConfigError as e:
        raise LoadError(str(e)) from None
    if config.text.mtp_num_hidden_layers < 1 or not has_mtp_tensors(folder):
        return None
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with torch.device("meta"):
        head = MTPHead(config.text)
    params = dict(head.named_parameters())
    adopt_tensors(folder, head, params, lambda k: k[len(PREFIX):] if k.startswith(PREFIX) else None,
                  lambda n: torch.float32 if n.endswith(FP32_PARAMS) else dt, dev, prefix=PREFIX)
    head.eval().requires_grad_(False)
    routes.assign(head)  # each bf16 linear's route on this machine: decode and prefill kernels (ops/routes.py)
    return head
