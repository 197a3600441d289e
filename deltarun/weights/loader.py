"""Load a Hugging Face Qwen3.5 model folder (config.json + safetensors) into `Qwen3_5ForCausalLM`.

Handles the published layouts: one `model.safetensors`, or shards listed in
`model.safetensors.index.json` (including the `model.safetensors-00001-of-0000N.safetensors` naming);
flat `qwen3_5_text` checkpoints (`model.layers.*`) as well as nested ones
(`model.language_model.*`). `model.visual.*` and `mtp.*` tensors are recognised and left for the
vision and MTP modules. Every failure is a `LoadError` that names the file or tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, apply_rope_override
from ..model.qwen3_5 import Qwen3_5ForCausalLM
from ..ops import routes
from . import quantize as quant
from .common import (  # noqa: F401
    FP32_PARAMS,
    LoadError,
    adopt_tensors,
    drop_pages,
    resolve_device,
    resolve_dtype,
    trim_heap,
    weight_files,
)

UNUSED_PREFIXES = ("model.visual.", "mtp.")
TRIM_EVERY = 128 << 20  # checkpoint bytes quantized on load between two trims of the C heap
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

    since_trim = [0]  # checkpoint bytes quantized since the C heap was last trimmed

    def quantize_tensor(name: str, tensor: torch.Tensor) -> bool:
        if name not in shells:
            return False
        shell = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(shell, quant.QuantLinear)  # install_shells put one at every name in shells
        quant.quantize_into(shell, tensor, dev, release=drop_pages)
        # glibc keeps the freed fp32 temporaries in its arenas; over a whole int8 load they piled up to ~0.2 GB
        # of resident heap (peak 1.11–1.17 GB against 0.94 after the final trim, 0.8B): trimmed as we go, the
        # peak is 0.95–0.97. Not after every tensor: freed memory handed back is faulted in again when reused.
        since_trim[0] += tensor.numel() * tensor.element_size()
        if since_trim[0] >= TRIM_EVERY:
            trim_heap()
            since_trim[0] = 0
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
        # a saved folder's int4 weights are read through the file mapping and repacked for the kernel, which
        # then holds the only copy: each one's pages go back once it is packed (int8 kernels read the stored
        # tensor itself)
        quant.finish(model, tied, release=drop_pages if saved else None)
        trim_heap()
    if tied and isinstance(model.lm_head, torch.nn.Linear):  # not quantized (e.g. K not a multiple of the group)
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.eval().requires_grad_(False)
    routes.assign(model)  # each bf16 linear's route on this machine: decode and prefill kernels (ops/routes.py)
    return model
