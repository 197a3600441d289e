"""A PEFT LoRA adapter's `adapter_config.json`: the fields deltarun reads, what they mean, and what it refuses.

Read: `r`, `lora_alpha`, `use_rslora` (scale alpha/√r instead of alpha/r), `rank_pattern` / `alpha_pattern`
(per-module r and alpha, keys matched as PEFT's `get_pattern_key` does), `target_modules` (a list of
module-name suffixes, a regex matched against the whole module name, or "all-linear"), `exclude_modules`,
`layers_to_transform` / `layers_pattern`. Matching follows PEFT's `check_target_module_exists`, on the
module names of the class the adapter was trained on (`model.language_model.layers.N…` or `model.layers.N…`).
Refused with a `LoRAError` naming the field: anything but `peft_type` LORA, `use_dora`, `bias` other than
"none", `lora_bias`, `modules_to_save` (full copies of modules: the embedding or lm_head, a changed
vocabulary), `fan_in_fan_out`, `target_parameters`, `layer_replication`, `trainable_token_indices`,
`alora_invocation_tokens`, `use_qalora`. The tensors and the model they apply to are weights/lora.py.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import LoadError


class LoRAError(LoadError):
    """An adapter that cannot be applied exactly; the message names the file, field, tensor or module at fault."""


# Fields that change what the adapter computes in ways deltarun does not implement: any truthy value is refused.
REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA) adapters are not supported",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layout) does not apply to Qwen3.5",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
}


@dataclass
class LoRAConfig:
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    @classmethod
    def from_folder(cls, folder: Path) -> "LoRAConfig":
        path = Path(folder) / "adapter_config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise LoRAError(f"{folder} is not a PEFT adapter folder: adapter_config.json is missing") from None
        except (OSError, json.JSONDecodeError) as e:
            raise LoRAError(f"{path} cannot be read: {e}") from None
        if not isinstance(raw, dict):
            raise LoRAError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, path.name)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "adapter_config.json") -> "LoRAConfig":
        if raw.get("peft_type", "LORA") != "LORA":
            raise LoRAError(f"{where}: peft_type {raw['peft_type']!r} is not supported (only LORA)")
        for name, why in REFUSED.items():
            if raw.get(name):
                raise LoRAError(f"{where}: {name} = {raw[name]!r}: {why}")
        if raw.get("bias", "none") != "none":
            raise LoRAError(f"{where}: bias = {raw['bias']!r}: only bias \"none\" is supported (the adapter "
                            "would change the base model's biases)")
        if raw.get("modules_to_save"):
            raise LoRAError(f"{where}: modules_to_save = {raw['modules_to_save']!r}: adapters that carry whole "
                            "modules (the embedding or lm_head, a changed vocabulary) are not supported")
        r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
        if not isinstance(r, int) or r < 1:
            raise LoRAError(f"{where}: r = {r!r} is not a positive integer")
        if raw.get("target_modules") is None:
            raise LoRAError(f"{where}: target_modules is missing")
        return cls(r=r, lora_alpha=alpha, use_rslora=bool(raw.get("use_rslora")),
                   target_modules=raw["target_modules"], exclude_modules=raw.get("exclude_modules"),
                   rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
                   layers_to_transform=raw.get("layers_to_transform"), layers_pattern=raw.get("layers_pattern"))

    def targets(self, key: str, linear_names: set[str]) -> bool:
        """Whether module `key` (a name in the trained class, e.g. `model.layers.3.mlp.up_proj`) carries LoRA:
        PEFT's `check_target_module_exists`. `linear_names`: the model's linear module names in that naming,
        which "all-linear" stands for."""
        ex = self.exclude_modules
        if ex and (re.fullmatch(ex, key) if isinstance(ex, str) else key in ex or any(key.endswith(f".{e}")
                                                                                         for e in ex)):
            return False
        tm = self.target_modules
        if tm == "all-linear":  # PEFT expands it to a list of names, so the layer filter applies
            return key in linear_names and self._in_layers(key)
        if isinstance(tm, str):
            return re.fullmatch(tm, key) is not None
        assert tm is not None  # from_dict refuses a config without target_modules
        if key in tm:
            return True
        if not any(key.endswith(f".{t}") for t in tm):
            return False
        return self._in_layers(key)

    def _in_layers(self, key: str) -> bool:
        """PEFT's `layers_to_transform` / `layers_pattern` filter (applied to list targets only, as PEFT does)."""
        idx = self.layers_to_transform
        if idx is None or idx == []:
            return True
        pats = self.layers_pattern
        pats = [pats] if isinstance(pats, str) else list(pats or [])
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key) if not pats else next(
            (m for p in pats if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
        if m is None:
            return False
        layer = int(m.group("idx"))
        return layer == idx if isinstance(idx, int) else layer in idx

    def rank_alpha_scale(self, key: str) -> tuple[int, float, float]:
        """(r, alpha, scale) of module `key`: the patterns' entry if one matches, else r / lora_alpha;
        scale alpha/r, or alpha/√r with use_rslora (PEFT's `update_layer`)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return r, alpha, alpha / (math.sqrt(r) if self.use_rslora else r)


def _pattern_key(patterns: dict, key: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern that matches a whole dotted suffix of `key`."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), key)
