"""Saving and resuming a fine-tuning run, and writing its result, each atomically (deltarun/atomic.py).

A run's checkpoint is the folder `OUT/checkpoint`: the adapter's weights (PEFT names), the AdamW state, the
torch RNG state, the number of optimizer steps done, and a fingerprint of what determines the run (the training
settings that change results, the data, the base). The data order is a function of (seed, epoch) and the step
count fixes the position in it (train/data.py `epoch_rows`), so a run stopped after step k and resumed makes the
same steps k+1 … as one that never stopped. A checkpoint whose fingerprint differs is refused, not half-used.
The folder is written under a temp name and renamed over the old one: a kill at any moment leaves the previous
checkpoint or the new one. The finished adapter files in OUT are each replaced the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import publish_dir, sweep, temp_path, write_text
from .lora import TrainableLoRA

CHECKPOINT = "checkpoint"


class ResumeError(ValueError):
    """A checkpoint that does not belong to this run (other settings, data or base), or is unreadable."""


@dataclass
class Saved:
    step: int
    losses: list[float]


def fingerprint(settings: dict, data: Path, base: Path) -> str:
    """What a resumed run must share with the one that wrote the checkpoint."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(hashlib.sha256(Path(data).read_bytes()).digest())
    h.update(str(Path(base).resolve()).encode())
    return h.hexdigest()[:16]


def save(out: Path, lora: TrainableLoRA, opt: torch.optim.Optimizer, step: int, losses: list[float],
         mark: str) -> None:
    """Write OUT/checkpoint for `step` optimizer steps done (replacing the previous one atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / CHECKPOINT
    sweep(out, CHECKPOINT)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        save_file(lora.peft_tensors(), str(tmp / "adapter_model.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "fingerprint": mark}))
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check(out: Path, mark: str) -> bool:
    """Whether OUT/checkpoint exists; ResumeError when it belongs to another run (checked before the model loads)."""
    path = out / CHECKPOINT / "state.json"
    if not path.is_file():
        return False
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path}: cannot read the checkpoint: {e}") from None
    if state.get("fingerprint") != mark:
        raise ResumeError(f"{out / CHECKPOINT} was written by a run with other settings, data or base model; use "
                          "the same ones to resume, or another output folder")
    return True


def load(out: Path, lora: TrainableLoRA, opt: torch.optim.Optimizer, mark: str) -> Saved | None:
    """Restore OUT/checkpoint into `lora` and `opt`; None when there is none."""
    folder = out / CHECKPOINT
    if not (folder / "state.json").is_file():
        return None
    try:
        state = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        extra = torch.load(folder / "optimizer.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ResumeError(f"{folder}: cannot read the checkpoint: {e}") from None
    if state.get("fingerprint") != mark:
        raise ResumeError(f"{folder} was written by a run with other settings, data or base model")
    lora.load_peft_tensors(tensors)
    opt.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"])
    return Saved(int(state["step"]), list(state.get("losses", [])))


def write_adapter(out: Path, lora: TrainableLoRA, base: str, log: dict) -> None:
    """The finished PEFT folder in OUT: adapter_config.json, adapter_model.safetensors, and the run's settings and
    losses (finetune.json). Each file replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out / "adapter_model.safetensors")
    try:
        save_file(lora.peft_tensors(), str(tmp), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would make it (safetensors creates files 0600)
        os.replace(tmp, out / "adapter_model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    write_text(out / "adapter_config.json", json.dumps(lora.adapter_config(base), indent=2) + "\n")
    write_text(out / "finetune.json", json.dumps(log, indent=2) + "\n")
