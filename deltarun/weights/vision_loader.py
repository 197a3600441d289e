"""Load the vision tower (`model.visual.*` tensors) of a Hugging Face Qwen3.5 model folder.

Separate from the text loader on purpose: a text-only run never touches these tensors, and the
tower can be loaded (or skipped) on its own. The module is built on the meta device and each parameter
is replaced by its checkpoint tensor, so weights are allocated once in the target dtype/device.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..model.vision import VisionConfig, VisionModel
from .common import LoadError, adopt_tensors, resolve_device, resolve_dtype

PREFIX = "model.visual."


def load_vision(folder: str | Path, dtype: str | torch.dtype | None = "auto",
                device: str | torch.device | None = "auto") -> VisionModel | None:
    """The vision tower of `folder`, or None when its config.json has no `vision_config`."""
    folder = Path(folder)
    try:
        config = ModelConfig.from_file(folder / "config.json")
    except ConfigError as e:
        raise LoadError(str(e)) from None
    if not config.vision:
        return None
    try:
        vcfg = VisionConfig.from_dict(config.vision)
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{folder / 'config.json'}: bad vision_config ({e})") from None
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with torch.device("meta"):
        model = VisionModel(vcfg)
    params = dict(model.named_parameters())
    adopt_tensors(folder, model, params, lambda k: k[len(PREFIX):] if k.startswith(PREFIX) else None,
                  lambda _: dt, dev, prefix=PREFIX)
    d = vcfg.head_dim // 2  # the rotary buffer is not in the checkpoint: build it for real
    model.inv_freq = (1.0 / vcfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(dev)
    return model.eval().requires_grad_(False)
