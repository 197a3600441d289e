"""Trainable LoRA weights over a deltarun model's projections, and the PEFT adapter folder they are saved as.

`TrainableLoRA` holds fp32 lora_A [r, in] / lora_B [out, r] parameters for each targeted projection, initialised
as PEFT's `LoraLayer.reset_lora_parameters` does with init_lora_weights=True (A kaiming-uniform with a = √5,
B zeros, so training starts from the base model), and computes each projection's delta scale · B(A(x)) for the
training forward (train/forward.py). Which modules are targeted follows PEFT's own matching (weights/lora_config.py
`LoRAConfig.targets`) on the names of the class the base checkpoint is (multimodal `model.language_model.layers.*`
or text-only `model.layers.*`); "all-linear" is every decoder projection deltarun takes LoRA on (weights/lora.py
`SUPPORTED`), never lm_head, as PEFT's expansion leaves the output layer out.
Reading adapters for inference, and merging, stay in weights/lora.py; this file only writes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..weights.lora import LM, PEFT_PREFIX, SUPPORTED, _linears
from ..weights.lora_config import LoRAConfig, LoRAError


@dataclass
class LoRASpec:
    """What to train: rank, alpha, rsLoRA and the target modules (suffixes such as "q_proj", a regex, or
    "all-linear"), as PEFT's LoraConfig takes them."""
    r: int = 16
    alpha: float = 32.0
    use_rslora: bool = False
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class TrainableLoRA(nn.Module):
    """fp32 lora_A / lora_B for each targeted projection of `model`, keyed by our module name."""

    def __init__(self, model: nn.Module, spec: LoRASpec, text_only: bool, seed: int = 0):
        super().__init__()
        if spec.r < 1:
            raise LoRAError(f"rank {spec.r} is not a positive integer")
        self.spec, self.text_only = spec, text_only
        linears = _linears(model)
        config = LoRAConfig(r=spec.r, lora_alpha=spec.alpha, use_rslora=spec.use_rslora,
                            target_modules=list(SUPPORTED) if spec.target_modules == "all-linear"
                            else spec.target_modules, exclude_modules=spec.exclude_modules or None)
        names = [n for n in linears if config.targets(self.trained_name(n), set())]
        if not names:
            raise LoRAError(f"target modules {spec.target_modules!r} match no projection of the model "
                            f"(known: {', '.join(SUPPORTED)})")
        self.names = names
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self._index: dict[int, int] = {}  # id(module) → position in names / A / B
        self._x: torch.Tensor | None = None  # the last input `delta` widened to fp32, and its fp32 copy
        self._xf: torch.Tensor | None = None
        g = torch.Generator().manual_seed(seed)
        for i, n in enumerate(names):
            mod = linears[n]
            fan_in, fan_out = int(getattr(mod, "in_features")), int(getattr(mod, "out_features"))
            a = torch.empty(spec.r, fan_in, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            device = getattr(mod, "weight").device
            self.A.append(nn.Parameter(a.to(device)))
            self.B.append(nn.Parameter(torch.zeros(fan_out, spec.r, dtype=torch.float32, device=device)))
            self._index[id(mod)] = i

    def trained_name(self, ours: str) -> str:
        """Our module name → its name in the base checkpoint's class (what PEFT's names and matching use)."""
        return "model." + ours[len(LM):] if self.text_only else ours

    def targets(self) -> list[str]:
        """The module-name suffixes trained (adapter_config.json's target_modules)."""
        return sorted({n.rpartition(".")[2] for n in self.names})

    def delta(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """scale · B(A(x)) in fp32 for projection `mod` (None when it carries no adapter)."""
        i = self._index.get(id(mod))
        if i is None:
            return None
        xf = self._xf
        if x is not self._x or xf is None:  # projections reading the same input (q/k/v, gate/up, in_proj_*)
            self._x, self._xf = x, xf = x, x.float()  # widen it once
        return F.linear(F.linear(xf, self.A[i]), self.B[i]) * self.spec.scale

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under PEFT's tensor names (`base_model.model.<module>.lora_A.weight`)."""
        out = {}
        for n, a, b in zip(self.names, self.A, self.B):
            key = PEFT_PREFIX + self.trained_name(n)
            out[key + ".lora_A.weight"] = a.detach().float().cpu().contiguous()
            out[key + ".lora_B.weight"] = b.detach().float().cpu().contiguous()
        return out

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the weights from PEFT-named tensors (a resumed run, or a test's chosen adapter)."""
        with torch.no_grad():
            for n, a, b in zip(self.names, self.A, self.B):
                key = PEFT_PREFIX + self.trained_name(n)
                try:
                    a.copy_(tensors[key + ".lora_A.weight"])
                    b.copy_(tensors[key + ".lora_B.weight"])
                except KeyError as e:
                    raise LoRAError(f"adapter tensor {e.args[0]} is missing") from None

    def adapter_config(self, base: str) -> dict:
        """adapter_config.json as PEFT writes it for this adapter (fields PEFT reads; the rest take PEFT's defaults)."""
        s = self.spec
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                "r": s.r, "lora_alpha": s.alpha, "use_rslora": s.use_rslora, "lora_dropout": 0.0,
                "target_modules": self.targets(), "exclude_modules": s.exclude_modules or None,
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "revision": None}

    def save(self, folder: Path, base: str) -> None:
        """Write adapter_config.json and adapter_model.safetensors into `folder` (which exists)."""
        (folder / "adapter_config.json").write_text(json.dumps(self.adapter_config(base), indent=2) + "\n")
        save_file(self.peft_tensors(), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
