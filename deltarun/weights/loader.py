"""Load a Hugging Face Qwen3.5 model folder (config.json + safetensors) into `Qwen3_5ForCausalLM`.

Handles the published layouts: one `model.safetensors`, or shards listed in
`model.safetensors.index.json` (including the `model.safetensors-00001-of-0000N.safetensors` naming);
flat `qwen3_5_text` checkpoints (`model.layers.*`) as well as nested ones
(`model.language_model.*`). `model.visual.*` and `mtp.*` tensors are recognised and left for the
vision and MTP modules. Every failure is a `LoadError` that names the file or tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ConfigError, ModelConfig, apply_rope_override
from ..model.qwen3_5 import Qwen3_5ForCausalLM
from ..ops import gemv
from . import quantize as quant

UNUSED_PREFIXES = ("model.visual.", "mtp.")
FP32_PARAMS = ("A_log", "in_proj_a.weight", "in_proj_b.weight")  # tiny, and they set every decay


class LoadError(RuntimeError):
    """A model folder that cannot be loaded; the message names the file or tensor at fault."""


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in (None, "auto"):
        return torch.bfloat16
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available (try --device cpu)")
    return dev


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, from the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index} is not a valid safetensors index: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise LoadError(f"{index.name} lists {f.name}, which is missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no *.safetensors weights in {folder}")
    return files


def _checkpoint_name(name: str, flat: bool) -> str:
    """Map a checkpoint tensor name to our module name (flat text-only checkpoints lack the nesting)."""
    if flat and name.startswith("model.") and not name.startswith("model.language_model."):
        return "model.language_model." + name[len("model."):]
    return name


def load_model(folder: str | Path, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto", rope_scaling: dict | str | None = None,
               context_length: int | None = None, quantization: str | None = None) -> Qwen3_5ForCausalLM:
    """Load a model folder; `rope_scaling` overrides the config's rope (e.g. "yarn:4"); `quantization`
    ("int8", "int4", "int4:32") quantizes the linear layers while loading (weights/quantize.py)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"model folder {folder} does not exist")
    if (folder / "gguf.json").is_file():  # a GGUF sidecar (weights/gguf_meta.py): weights read from the file
        from .gguf import load_gguf

        return load_gguf(folder, dtype, device, rope_scaling, context_length, quantization)
    try:
        config = ModelConfig.from_file(folder / "config.json")
        apply_rope_override(config, rope_scaling, context_length)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        saved = quant.QuantSpec.from_config(config.raw)
        asked = quant.QuantSpec.parse(quantization)
    except (ValueError, KeyError) as e:
        raise LoadError(f"{folder}: {e}") from None
    if saved and asked and asked != saved:
        raise LoadError(f"{folder} is already quantized as {saved.name} (group {saved.group_size}); "
                        f"it cannot be loaded as {quantization}")
    spec = saved or asked

    # Built on the meta device: each parameter is then replaced by its checkpoint tensor, so
    # weights are allocated once, directly in the target dtype and device.
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    tied = config.text.tie_word_embeddings
    shells = quant.install_shells(model, spec, dt) if spec else {}
    params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers(remove_duplicate=False))
    if tied:
        params.pop("lm_head.weight", None)
        for part in ("qweight", "scales", "zeros"):
            params.pop(f"lm_head.{part}", None)  # filled from the embedding by quant.finish
    on_load = spec is not None and not saved  # quantize-on-load: full-precision `X.weight` fills a shell
    if on_load:
        for name, shape in shells.items():
            base = name.removesuffix("weight")
            if any(p.startswith(base) for p in params):
                for part in ("qweight", "scales", "zeros"):
                    params.pop(base + part, None)
                params[name] = torch.empty(shape, device="meta")

    def quantize_tensor(name: str, tensor: torch.Tensor) -> bool:
        if name not in shells:
            return False
        quant.quantize_into(model.get_submodule(name.removesuffix(".weight")), tensor, dev)
        return True

    flat = config.model_type == "qwen3_5_text"

    def name_of(key: str) -> str | None:
        if key.startswith(UNUSED_PREFIXES):
            return None
        name = _checkpoint_name(key, flat)
        return None if name.startswith("lm_head.") and name not in params else name  # tied: embedding serves

    def dtype_of(name: str) -> torch.dtype | None:
        if name.endswith(".qweight"):
            return None  # int8 / packed uint8 stay as stored
        return torch.float32 if name.endswith(FP32_PARAMS) else dt

    adopt_tensors(folder, model, params, name_of, dtype_of, dev, convert=quantize_tensor if on_load else None)
    if spec:
        quant.finish(model, tied)
    if tied and isinstance(model.lm_head, torch.nn.Linear):  # not quantized (e.g. K not a multiple of the group)
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.eval().requires_grad_(False)
    gemv.accelerate(model)  # decode matmuls through the CPU kernel where it is built (ops/gemv.py)
    return model


def adopt_tensors(folder: Path, model: torch.nn.Module, params: dict[str, torch.Tensor],
                  name_of, dtype_of, device: torch.device, prefix: str = "", convert=None) -> None:
    """Replace each parameter/buffer of a meta-built `model` by its checkpoint tensor (cast to
    `dtype_of(name)`, None = keep the stored dtype).

    `name_of(key)` maps a checkpoint key to a parameter name, or None to skip the tensor;
    `convert(name, tensor)` may consume a tensor itself (returns True). Unexpected, wrongly-shaped or
    missing tensors raise LoadError naming the tensor (missing ones as `prefix + name`).
    """
    loaded: set[str] = set()
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = name_of(key)
                    if name is None:
                        continue
                    if name not in params:
                        raise LoadError(f"{path.name}: unexpected tensor {key} (not part of a Qwen3.5 model)")
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(params[name].shape):
                        raise LoadError(f"{path.name}: tensor {key} has shape {list(tensor.shape)}, "
                                        f"expected {list(params[name].shape)}")
                    loaded.add(name)
                    if convert is not None and convert(name, tensor):
                        continue
                    module_name, _, attr = name.rpartition(".")
                    module = model.get_submodule(module_name)
                    tensor = tensor.to(device=device, dtype=dtype_of(name) or tensor.dtype)
                    if attr in module._buffers:
                        module._buffers[attr] = tensor
                    else:
                        setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
        except SafetensorError as e:
            raise LoadError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise LoadError(f"cannot read {path}: {e}") from None
    missing = [n for n in params if n not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"tensor {prefix}{missing[0]} is missing from the checkpoint in {folder}{more}")
