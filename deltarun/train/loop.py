"""`finetune`: the training loop — base model + chat JSONL → a PEFT LoRA folder (the `deltarun finetune` command).

Steps: AdamW over the LoRA weights only (the base is frozen), `grad_accum` packed rows per optimizer step, the
loss the mean over every loss token of the step (so accumulating rows equals one bigger batch), a linear warmup
then a cosine (or linear, or constant) learning rate, gradient clipping at `max_grad_norm`. The run is a
function of its settings and seed only: the data order comes from (seed, epoch), the adapter's initial A from
the seed, and no dropout draws random numbers — which is what makes resuming exact (train/checkpoint.py).
Progress: a rich bar with the step, loss and tokens/s (tokens of the packed rows, loss tokens or not).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..ops import kernels
from ..processor.chat_template import ChatTemplate
from ..processor.tokenizer import Tokenizer
from ..threads import set_threads
from ..weights.common import LoadError, resolve_device
from ..weights.loader import load_model
from . import checkpoint
from .data import epoch_rows, load_examples
from .forward import Row, TrainForward
from .lora import LoRASpec, TrainableLoRA


@dataclass
class TrainConfig:
    rank: int = 16
    alpha: float = 32.0
    use_rslora: bool = False
    target_modules: list[str] | str = "all-linear"
    epochs: int = 1
    steps: int | None = None  # optimizer steps in all (then epochs repeat as needed); None: `epochs` passes
    lr: float = 2e-4
    warmup_steps: int | None = None  # None: 5% of the steps
    schedule: str = "cosine"  # cosine | linear | constant (after the warmup)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    batch_tokens: int = 2048
    grad_accum: int = 1
    seed: int = 0
    checkpointing: bool = True
    compute: str = "auto"  # auto | fp32 | bf16
    base_dtype: str = "bfloat16"
    device: str = "auto"
    threads: int | None = None
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    resume: bool = False

    def check(self) -> None:
        for name in ("rank", "epochs", "batch_tokens", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, not {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, not {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule {self.schedule!r}: use cosine, linear or constant")
        if self.compute not in ("auto", "fp32", "bf16"):
            raise ValueError(f"compute {self.compute!r}: use auto, fp32 or bf16")
        if self.save_every < 0:
            raise ValueError(f"save-every must be 0 or more, not {self.save_every}")

    def determines_result(self) -> dict:
        """Settings a resumed run must share (threads, device, saving and resuming do not change the steps)."""
        d = asdict(self)
        for k in ("threads", "save_every", "resume", "device"):
            d.pop(k)
        if d["steps"] is None:
            d.pop("steps")
        return d


def compute_dtype(compute: str, device: torch.device) -> torch.dtype:
    """fp32 or bf16 compute: `auto` takes bf16 where it is fast (a GPU with bf16, a CPU with hardware bf16
    matmul: ops/kernels.py `native_bf16_matmul`), else fp32."""
    if compute == "fp32":
        return torch.float32
    if compute == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if kernels.native_bf16_matmul() else torch.float32


def plan_steps(examples: list, cfg: TrainConfig) -> list[list[Row]]:
    """Every optimizer step's rows, in order: each epoch's packed rows in groups of grad_accum, epochs repeating
    until `steps` when it is given."""
    steps: list[list[Row]] = []
    epoch = 0
    while True:
        rows = epoch_rows(examples, cfg.batch_tokens, cfg.seed, epoch)
        for i in range(0, len(rows), cfg.grad_accum):
            steps.append(rows[i:i + cfg.grad_accum])
            if cfg.steps is not None and len(steps) == cfg.steps:
                return steps
        epoch += 1
        if cfg.steps is None and epoch == cfg.epochs:
            return steps


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else total // 20
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant" or total <= warm:
        return cfg.lr
    p = (step - warm) / max(1, total - warm)
    return cfg.lr * (0.5 * (1 + math.cos(math.pi * p)) if cfg.schedule == "cosine" else 1 - p)


@dataclass
class Result:
    out: Path
    steps: int
    losses: list[float]  # mean loss of every step
    tokens_per_s: float


def finetune(base: str | Path, data: str | Path, out: str | Path, config: TrainConfig | None = None,
             progress: bool = True, stop_after: int | None = None,
             on_step: Callable[[int, float], None] | None = None, **kw) -> Result:
    """Train a LoRA adapter of `base` (a model folder or name) on the chat JSONL `data`; write the PEFT folder
    `out`. `config` or keyword fields of TrainConfig. `stop_after`: end (with a checkpoint) after that many steps
    of the plan, as an interrupted run would (tests)."""
    from ..store.resolve import resolve_model

    cfg = config or TrainConfig(**kw)
    cfg.check()
    set_threads(cfg.threads)
    base_path = Path(resolve_model(str(base)))
    out = Path(out).expanduser()
    device = resolve_device(cfg.device)
    try:
        model_cfg = ModelConfig.from_file(base_path / "config.json")
    except ConfigError as e:
        raise LoadError(str(e)) from None
    tokenizer = Tokenizer.from_folder(base_path)
    template = ChatTemplate.from_folder(base_path) or ChatTemplate.builtin(
        thinking_default=model_cfg.text.hidden_size >= 2560)
    examples = load_examples(data, template, tokenizer, model_cfg.text.vocab_size)  # bad data fails before the load
    plan = plan_steps(examples, cfg)
    mark = checkpoint.fingerprint(cfg.determines_result(), Path(data), base_path)
    resuming = cfg.resume and checkpoint.check(out, mark)
    model = load_model(base_path, dtype=cfg.base_dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    lora = TrainableLoRA(model, LoRASpec(cfg.rank, cfg.alpha, cfg.use_rslora, cfg.target_modules),
                         text_only=model.config.model_type == "qwen3_5_text", seed=cfg.seed)
    fw = TrainForward(model, lora, compute_dtype(cfg.compute, device), cfg.checkpointing)
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses = 0, []
    if resuming and (saved := checkpoint.load(out, lora, opt, mark)) is not None:
        start, losses = saved.step, saved.losses
    end = len(plan) if stop_after is None else min(len(plan), stop_after)
    tokens, t0 = 0, time.perf_counter()
    bar = _Bar(len(plan), start, progress)
    with bar:
        for step in range(start, end):
            rows = plan[step]
            n_loss = sum(r.loss_tokens for r in rows)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, len(plan), cfg)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for row in rows:
                row = Row(row.ids.to(device), row.labels.to(device), row.lengths)
                loss = fw.loss_sum(row) / n_loss
                loss.backward()
                total += loss.item()
                tokens += len(row.ids)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(lora.parameters(), cfg.max_grad_norm)
            opt.step()
            losses.append(total)
            if on_step is not None:
                on_step(step, total)
            bar.update(step + 1, total, tokens / (time.perf_counter() - t0))
            done = step + 1
            if done < end and cfg.save_every and done % cfg.save_every == 0:
                checkpoint.save(out, lora, opt, done, losses, mark)
    speed = tokens / max(time.perf_counter() - t0, 1e-9)
    checkpoint.save(out, lora, opt, end, losses, mark)
    if end < len(plan):  # stopped early: the checkpoint resumes it
        return Result(out, end, losses, speed)
    log = {"base": str(base_path), "data": str(data), "examples": len(examples), "steps": end, "losses": losses,
           "settings": cfg.determines_result(), "compute": str(fw.dtype).removeprefix("torch.")}
    checkpoint.write_adapter(out, lora, str(base_path), log)
    return Result(out, end, losses, speed)


class _Bar:
    """A rich progress bar (stderr) with the loss and tokens/s; nothing when `show` is off."""

    def __init__(self, total: int, done: int, show: bool):
        self.progress = None
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.progress = Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                                     TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.progress.add_task("train", total=total, completed=done, loss="–", speed="–")

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, done: int, loss: float, speed: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, loss=f"{loss:.4f}", speed=f"{speed:.1f}")
