"""Load the vision tower (`model.visual.*` tensors) of a Hugging Face Qwen3.5 model folder.

Separate from the text loader on purpose: a text-only run never touches these tensors, and the
tower can be loaded (or skipped) on its own. The module is built on the meta device and each parameter
is replaced by its checkpoint tensor, so weights are allocated once in the target dtype/device.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ConfigError, ModelConfig
from ..model.vision import VisionConfig, VisionModel
from .loader import LoadError, resolve_device, resolve_dtype, weight_files

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
    loaded: set[str] = set()
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if not key.startswith(PREFIX):
                        continue
                    name = key[len(PREFIX):]
                    if name not in params:
                        raise LoadError(f"{path.name}: unexpected vision tensor {key}")
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(params[name].shape):
                        raise LoadError(f"{path.name}: tensor {key} has shape {list(tensor.shape)}, "
                                        f"expected {list(params[name].shape)}")
                    module_name, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(module_name), attr,
                            torch.nn.Parameter(tensor.to(device=dev, dtype=dt), requires_grad=False))
                    loaded.add(name)
        except SafetensorError as e:
            raise LoadError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise LoadError(f"cannot read {path}: {e}") from None
    missing = [n for n in params if n not in loaded]
    if missing:
        raise LoadError(f"tensor {PREFIX}{missing[0]} is missing from the checkpoint in {folder}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    d = vcfg.head_dim // 2  # the rotary buffer is not in the checkpoint: build it for real
    model.inv_freq = (1.0 / vcfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(dev)
    return model.eval().requires_grad_(False)
