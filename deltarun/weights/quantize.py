"""Which tensors of a Qwen3.5 checkpoint get quantized, and how: on load or into a saved folder.

`QuantSpec.parse("int4")` (or "int4:32" for the group size) names a scheme; `install_shells` swaps a
meta-built model's Linears (and the token embedding) for empty `QuantLinear`/`QuantEmbedding` shells
that the loader then fills, either from full-precision weights (`quantize_into`, quantize-on-load) or
from a folder saved by `save_quantized` (`deltarun quantize`), which loads without re-quantizing.
Kept in full precision: norms, conv1d, DeltaNet's tiny a/b gate projections and A_log/dt_bias (they
set every decay), the vision tower and the MTP head (loaded apart, by weights/mtp_loader.py). The kernels
and formats themselves live in ops/quant.py.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import publish_dir, sweep, temp_path
from ..ops.quant import BITS, DEFAULT_GROUP, QuantEmbedding, QuantLinear, quantize_int4_packed, quantize_int8

KEEP_FULL = ("in_proj_a", "in_proj_b")  # [num_v_heads, H]: a few KB, and they gate every decay
QUANT_METHOD = "deltarun"


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int = DEFAULT_GROUP

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @classmethod
    def parse(cls, text: "str | QuantSpec | None") -> "QuantSpec | None":
        """"int8", "int4", "int4:32" (group size), "none"/None → no quantization."""
        if text is None or isinstance(text, QuantSpec):
            return text
        name, _, group = str(text).lower().partition(":")
        if name in ("", "none", "bf16", "fp16", "f16", "fp32", "f32"):
            return None
        if name not in BITS:
            raise ValueError(f"unknown quantization {text!r}; use int8, int4 or int4:GROUP (32, 64, 128)")
        if group and (name != "int4" or not group.isdigit() or int(group) not in (32, 64, 128, 256)):
            raise ValueError(f"bad group size in {text!r}; int4 takes 32, 64, 128 or 256")
        return cls(BITS[name], int(group) if group else DEFAULT_GROUP)

    @classmethod
    def from_config(cls, raw: dict) -> "QuantSpec | None":
        q = raw.get("quantization_config")
        if not q:
            return None
        if q.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"quantization method {q.get('quant_method')!r} is not supported "
                             f"(deltarun reads its own int8/int4 folders and GGUF files)")
        return cls(int(q["bits"]), int(q.get("group_size") or DEFAULT_GROUP))

    def config_entry(self) -> dict:
        return {"quant_method": QUANT_METHOD, "bits": self.bits, "group_size": self.group_size,
                "format": "int8: qweight·scales per row; int4: (q-8)·scales+zeros per group, 2 per byte"}


def is_quantizable(name: str, shape: tuple[int, ...], spec: QuantSpec) -> bool:
    """Does checkpoint tensor `name` of `shape` get quantized under `spec`? (`.weight` of a Linear/Embedding.)"""
    if len(shape) != 2 or not name.endswith(".weight") or "visual" in name or name.startswith("mtp."):
        return False
    if any(k in name for k in KEEP_FULL):
        return False
    module = name.removesuffix(".weight").rpartition(".")[2]
    if not ("proj" in module or module in ("fc", "embed_tokens", "lm_head")):
        return False
    return spec.bits == 8 or shape[1] % spec.group_size == 0


def install_shells(model: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """Swap every quantizable Linear/Embedding of a meta-built model for an empty quantized shell.

    Returns {"<module>.weight": (N, K)} for the swapped modules (names as in the model)."""
    swapped = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and mod.bias is None:
            shape = (mod.out_features, mod.in_features)
            new = QuantLinear(mod.in_features, mod.out_features, spec.bits, spec.group_size, dtype, "meta")
        elif isinstance(mod, nn.Embedding):
            shape = (mod.num_embeddings, mod.embedding_dim)
            new = QuantEmbedding(mod.num_embeddings, mod.embedding_dim, spec.bits, spec.group_size, dtype, "meta")
        else:
            continue
        if not is_quantizable(f"{name}.weight", shape, spec):
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        swapped[f"{name}.weight"] = shape
    return swapped


def quantize_into(module: QuantLinear, weight: torch.Tensor, device: torch.device, release=None) -> None:
    """Fill a shell from a full-precision weight [N, K] (quantized in fp32 on the CPU, then moved); `release`:
    called on each block of rows of `weight` once consumed (ops/quant.py `_by_rows`)."""
    if module.bits == 8:
        q, s = quantize_int8(weight, release=release)
        module.set_int8(q.to(device), s.to(device))
    else:
        packed, s, z = quantize_int4_packed(weight, module.group_size, release=release)
        module.set_int4(packed.to(device), s.to(device), z.to(device))


def finish(model: nn.Module, tied: bool, release=None) -> None:
    """After loading: share the tied embedding's rows with lm_head, then pack every Linear for its kernel;
    `release(q)`: called on each stored weight the packed copy replaced (weights/common.py `drop_pages`)."""
    embed, head = model.get_submodule("model.language_model.embed_tokens"), model.get_submodule("lm_head")
    shared = (embed, head) if tied and isinstance(embed, QuantEmbedding) and isinstance(head, QuantLinear) else None
    if shared:
        e, h = shared
        if e.bits == 8:
            assert e.qweight is not None and e.scales is not None  # not shared yet: the embedding holds its rows
            h.set_int8(e.qweight, e.scales)
        else:
            assert e.qweight is not None and e.scales is not None and e.zeros is not None
            h.set_int4(e.qweight, e.scales, e.zeros)
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            stored = mod.qweight
            mod.pack()
            if release is not None and stored is not None and mod.qweight is None:
                release(stored)
    if shared:
        e, h = shared
        e.share(h)


def save_quantized(src: Path, out: Path, spec: QuantSpec) -> dict[str, int]:
    """Write a quantized copy of model folder `src` to `out` (streaming one tensor at a time).

    Returns byte counts {"before": …, "after": …} of the weights."""
    src, out = Path(src), Path(out)
    raw = json.loads((src / "config.json").read_text())
    if raw.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({raw['quantization_config'].get('bits')}-bit)")
    tied = raw.get("tie_word_embeddings", raw.get("text_config", {}).get("tie_word_embeddings", False))
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out.parent)  # what a killed earlier run left (its temp folder is hidden, never listed)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        before, after = _write_quantized(src, tmp, raw, tied, spec)
        publish_dir(tmp, out)  # a half-written folder is never left under the final name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after publish_dir; a failed run's partial folder
    return {"before": before, "after": after}


def _write_quantized(src: Path, tmp: Path, raw: dict, tied: bool, spec: QuantSpec) -> tuple[int, int]:
    """Fill folder `tmp` with the quantized checkpoint; returns the weights' bytes before and after."""
    from .common import weight_files

    tensors, before = {}, 0
    for path in weight_files(src):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                before += t.numel() * t.element_size()
                if key == "lm_head.weight" and tied:
                    continue
                if is_quantizable(key, tuple(t.shape), spec):
                    mod = QuantLinear.from_float(t, spec.bits, spec.group_size, torch.bfloat16)
                    for part, value in mod.portable().items():
                        tensors[key.removesuffix("weight") + part] = value.contiguous()
                else:
                    tensors[key] = t.contiguous()
    after = sum(t.numel() * t.element_size() for t in tensors.values())
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, tmp / item.name)
    raw["quantization_config"] = spec.config_entry()
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return before, after
