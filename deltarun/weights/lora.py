"""PEFT LoRA adapters on a Qwen3.5 decoder: read an adapter folder, apply it exactly, or merge it into a checkpoint.

An adapter folder is PEFT's `save_pretrained` output: adapter_config.json (weights/lora_config.py) and
adapter_model.safetensors with `base_model.model.<module>.lora_A.weight` [r, in] and `….lora_B.weight` [out, r],
`<module>` named as in the class it was trained on: `model.language_model.layers.N.…` (the multimodal
Qwen3_5ForConditionalGeneration) or `model.layers.N.…` (the text-only Qwen3_5ForCausalLM). Targets: the
decoder's linear projections (`SUPPORTED`) of the attention, MLP and DeltaNet layers. Each module computes
y = base(x) + scale · B(A(x)) with scale = alpha / r (alpha / √r with use_rslora), as PEFT does.

Applying puts the adapter in a slot of the model's `LoRASlots` (ops/lora.py: each targeted module's `delta`
hook computes every slot's delta, so bf16, fp32 and int8/int4 bases all take it, and a batch may mix
adapters): `apply_lora` for every forward of a model, engine/adapters.py `AdapterSet` per request.
Merging (`merge`) adds scale · B·A to the base's weights in fp32 and writes a checkpoint like the base's.

Decisions — refused with a `LoRAError` naming the culprit, never loaded partly:
- vision-tower modules (`model.visual.*`, which target_modules "all-linear" yields on the multimodal class):
  deltarun's vision tower has no adapter hook, and applying only the text part would silently change what
  the adapter computes on images. Train with target_modules limited to the language model (a regex such as
  `.*language_model.*\\.(q_proj|…)`, or exclude_modules) or on the text-only class.
- lm_head / embed_tokens LoRA and modules_to_save (a changed vocabulary or output layer).
- a GGUF base: its loader reorders the DeltaNet value heads (weights/gguf.py), which the adapter's rows and
  columns would have to follow; use the Hugging Face checkpoint of the same model.
- a rank above `max_rank` (the server's `--max-lora-rank`), a module the base lacks, a tensor whose shape does
  not fit the base's module or the config's rank, a tensor for a module target_modules does not match.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import publish_dir, sweep, temp_path
from ..config import ConfigError, ModelConfig
from ..model.qwen3_5 import Qwen3_5ForCausalLM
from ..ops import lora as lora_ops
from ..ops.quant import QuantLinear
from .common import weight_files
from .lora_config import LoRAConfig, LoRAError

SUPPORTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
PEFT_PREFIX = "base_model.model."
LM = "model.language_model."  # our (and the multimodal class's) decoder prefix; the text-only class has "model."
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B"}
__all__ = ["LoRAError", "LoRAWeights", "Adapter", "read_adapter", "apply_lora", "put", "remove_lora", "merge"]


@dataclass
class LoRAWeights:
    A: torch.Tensor  # lora_A [r, in]
    B: torch.Tensor  # lora_B [out, r]
    scale: float

    def merged(self) -> torch.Tensor:
        """scale · B·A [out, in] in fp32: what merging adds to the base weight."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class Adapter:
    path: Path
    config: LoRAConfig
    weights: dict[str, LoRAWeights]  # our module name (model.language_model.layers.N.…) → its A, B, scale
    text_only: bool  # trained on the text-only class (`model.layers.*` names)

    @property
    def max_rank(self) -> int:
        return max(w.A.shape[0] for w in self.weights.values())


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder's projections an adapter may target, by our module name."""
    return {n: m for n, m in model.named_modules()
            if n.startswith(LM + "layers.") and n.rpartition(".")[2] in SUPPORTED
            and isinstance(m, (nn.Linear, QuantLinear))}


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        other = " (adapter_model.bin is a pickle: save the adapter with safe_serialization)" if (
            folder / "adapter_model.bin").is_file() else ""
        raise LoRAError(f"{folder}: adapter_model.safetensors is missing{other}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"{path} is not a valid safetensors file: {e}") from None


def _split(key: str) -> tuple[str, str]:
    """A PEFT tensor name → (module name in the trained class, "A" or "B"); LoRAError for anything else."""
    if not key.startswith(PEFT_PREFIX):
        raise LoRAError(f"adapter tensor {key}: not a PEFT LoRA name (expected {PEFT_PREFIX}…)")
    rest = key[len(PEFT_PREFIX):]
    for suffix, part in PARTS.items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], part
    if "lora_magnitude_vector" in rest:
        raise LoRAError(f"adapter tensor {key}: DoRA (use_dora) adapters are not supported")
    if "lora_embedding_" in rest:
        raise LoRAError(f"adapter tensor {key}: LoRA on the embedding is not supported")
    if rest.endswith(".bias"):
        raise LoRAError(f"adapter tensor {key}: LoRA biases (lora_bias) are not supported")
    raise LoRAError(f"adapter tensor {key}: not a lora_A / lora_B weight")


def _ours(module: str) -> tuple[str, bool]:
    """A trained-class module name → (our module name, whether the name is the text-only class's)."""
    if module.startswith(LM):
        return module, False
    if module.startswith("model.") and not module.startswith("model.visual."):
        return LM + module[len("model."):], True
    return module, False


def _in_out(mod: nn.Module) -> tuple[int, int]:
    return int(getattr(mod, "in_features")), int(getattr(mod, "out_features"))


def read_adapter(folder: str | Path, model: nn.Module, max_rank: int | None = None) -> Adapter:
    """Read and check a PEFT LoRA folder against `model` (a loaded or meta-built Qwen3_5ForCausalLM)."""
    folder = Path(folder)
    if getattr(model, "from_gguf", False):
        raise LoRAError(f"{folder}: LoRA adapters on a GGUF base are not supported (its loader reorders the "
                        "DeltaNet value heads); load the Hugging Face checkpoint of the model instead")
    config = LoRAConfig.from_folder(folder)
    tensors = _read_tensors(folder)
    if not tensors:
        raise LoRAError(f"{folder}: adapter_model.safetensors holds no tensors")
    linears = _linears(model)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    vision, naming = [], set()
    for key, t in tensors.items():
        module, part = _split(key)
        if module.startswith("model.visual."):
            vision.append(module)
            continue
        ours, text_only = _ours(module)
        naming.add(text_only)
        if ours not in linears:
            raise LoRAError(f"adapter tensor {key}: the base model has no module {module} that takes LoRA "
                            f"(supported: the decoder's {', '.join(SUPPORTED)})")
        groups.setdefault(module, {})[part] = t
    if vision:
        names = sorted(set(vision))
        raise LoRAError(f"{folder}: the adapter targets vision-tower modules, which deltarun does not adapt: "
                        f"{', '.join(names[:4])}{' …' if len(names) > 4 else ''} ({len(names)} modules); train it "
                        "with target_modules limited to the language model")
    if len(naming) > 1:
        raise LoRAError(f"{folder}: tensor names mix the multimodal (model.language_model.*) and text-only "
                        "(model.layers.*) prefixes")
    text_only = naming.pop()
    trained = {(("model." + n[len(LM):]) if text_only else n) for n in linears}  # "all-linear", in their naming
    weights: dict[str, LoRAWeights] = {}
    for module, parts in groups.items():
        if set(parts) != {"A", "B"}:
            raise LoRAError(f"{folder}: module {module} has lora_{next(iter(parts))} but not its pair")
        if not config.targets(module, trained):
            raise LoRAError(f"{folder}: module {module} has LoRA tensors but target_modules "
                            f"{config.target_modules!r} does not match it")
        r, _, scale = config.rank_alpha_scale(module)
        ours = _ours(module)[0]
        fan_in, fan_out = _in_out(linears[ours])
        a, b = parts["A"], parts["B"]
        if tuple(a.shape) != (r, fan_in) or tuple(b.shape) != (fan_out, r):
            raise LoRAError(f"{folder}: module {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                            f"the base's [{fan_out}, {fan_in}] projection at rank r = {r} (r / rank_pattern)")
        if max_rank is not None and r > max_rank:
            raise LoRAError(f"{folder}: module {module} has rank {r}, above max_lora_rank = {max_rank} "
                            "(--max-lora-rank)")
        weights[ours] = LoRAWeights(a, b, scale)
    return Adapter(folder, config, weights, text_only)


def apply_lora(model: nn.Module, adapter: Adapter) -> None:
    """Run every forward of `model` with `adapter` (replacing any earlier one): slot 0 of the model's
    `LoRASlots` as the default slot. The engine serves many adapters through `AdapterSet` instead."""
    remove_lora(model)
    slots = lora_ops.slots_of(model, 1, adapter.max_rank)
    put(model, slots, 0, adapter)
    slots.default = 0


def put(model: nn.Module, slots: lora_ops.LoRASlots, slot: int, adapter: Adapter | None) -> None:
    """Slot `slot` of `slots` ← `adapter`'s weights (None: empty), hooking the modules it targets."""
    for name, h in slots.hooks.items():
        if adapter is None or name not in adapter.weights:
            h.set(slot, None, None, 0.0)
    for name, w in (adapter.weights.items() if adapter is not None else ()):
        slots.hook(model, name).set(slot, w.A, w.B, w.scale)


def remove_lora(model: nn.Module) -> None:
    """Take every adapter off `model`: the base model again."""
    lora_ops.clear(model)


def load_lora(folder: str | Path, model: nn.Module, max_rank: int | None = None) -> Adapter:
    """`read_adapter` + `apply_lora`."""
    adapter = read_adapter(folder, model, max_rank)
    apply_lora(model, adapter)
    return adapter


def merge(base: str | Path, adapter: str | Path, out: str | Path, max_rank: int | None = None) -> Path:
    """Write to `out` the checkpoint folder `base` with the adapter folded into its weights (fp32 sums, stored
    in each weight's own dtype); every other file of `base` is copied. Written under a temp name and renamed."""
    base, out = Path(base), Path(out).expanduser()
    if (base / "gguf.json").is_file():
        raise LoRAError(f"{base}: merging into a GGUF base is not supported; use the Hugging Face checkpoint")
    if out.resolve() == base.resolve():
        raise LoRAError("the output folder must differ from the base model folder")
    try:
        config = ModelConfig.from_file(base / "config.json")
    except ConfigError as e:
        raise LoRAError(str(e)) from None
    if config.raw.get("quantization_config"):
        raise LoRAError(f"{base} is quantized: merge into the unquantized checkpoint (then quantize the result)")
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    ad = read_adapter(adapter, model, max_rank)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out.parent)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        _write_merged(base, tmp, ad, flat=config.model_type == "qwen3_5_text")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after publish_dir; a failed run's partial folder
    return out


def _write_merged(base: Path, tmp: Path, ad: Adapter, flat: bool) -> None:
    from safetensors import safe_open

    from .loader import _checkpoint_name

    tensors, done = {}, set()
    for path in weight_files(base):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                name = _checkpoint_name(key, flat).removesuffix(".weight")
                if key.endswith(".weight") and name in ad.weights:
                    t = (t.float() + ad.weights[name].merged()).to(t.dtype)
                    done.add(name)
                tensors[key] = t.contiguous()
    if missing := sorted(set(ad.weights) - done):
        raise LoRAError(f"{base}: the checkpoint lacks {missing[0]}.weight, which the adapter targets")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for item in base.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, tmp / item.name)
