"""Many LoRA adapters in one forward: stacked adapter weights per projection and a per-row adapter index.

`LoRASlots` (one per model, `model.lora_slots`) holds `num_slots` adapters at once, each in a slot. Every
projection some loaded adapter targets carries a `SlotDelta` as its `delta` hook (ops/linear.py `Linear`,
ops/quant.py `QuantLinear`, model/deltanet.py's a/b projections), with the slots' lora_A rows stacked in
A [S·R, in] and scale·lora_Bᵀ in Bt [S·R, out] (R: the largest rank loaded; a smaller rank's rows and a
slot's untargeted modules are zeros). A forward's rows pick their slot through one 0/1 mask [rows, S·R],
so a batch mixing adapters (and rows with none) costs two dense matmuls per projection whatever the mix:

    delta(x) = ((x · Aᵀ) ⊙ mask) · Bt      x [rows, in] → [rows, out]

— the S-LoRA / Punica computation done with dense GEMMs, which on a CPU beat per-row gathers for the few
slots a batch holds (S·R ≪ in). Which slot each sequence uses is set per forward by the engine
(`LoRASlots.use`, one slot per sequence: x's leading dimension is the batch's sequences); `default` is the
slot for forwards run outside the engine (weights/lora.py `apply_lora`). The fused C++ decode layers
(ops/layer.py `with_adapters`) take A, Bt and the mask beside each linear's kernel tensors and compute the
same delta with the same ops.
What an adapter is and how it is read lives in weights/lora.py; which adapter gets which slot, in
engine/adapters.py.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv, kernels

NONE = -1  # a sequence that runs without an adapter


KERNEL_ROWS = 16  # up to this many rows (a decode step) the delta runs on our kernels (ops/gemv.py)
# fp32 projections whose decode steps run on a kernel (gemv_f32, model/deltanet.py): their deltas take the kernel
# path too (an fp32 model's other projections decode on torch's GEMM, and so do their deltas)
F32_GEMV = ("in_proj_a", "in_proj_b")


class SlotDelta:
    """A projection's `delta` hook: x [..., in] → the delta of each row's slot [..., out] in x's dtype, or
    None when no row of the forward has an adapter.

    A decode step's few rows run on our kernels: the shrink x · Aᵀ on the GEMV kernel (S·R outputs: on the
    calling thread; fp32 weights on torch's), the expand on csrc/lora.cpp, which skips the slots a row does
    not use — where torch's GEMMs would open two OpenMP regions per projection, each slow to gather its
    threads on a busy machine.
    csrc/layer.cpp `lin` makes the same calls (`kernel_path`), so the fused layers' sums are bit for bit these."""

    def __init__(self, slots: LoRASlots, fan_in: int, fan_out: int, dtype: torch.dtype, device: torch.device):
        self.slots, self.fan_in, self.fan_out = slots, fan_in, fan_out
        self.A = torch.zeros(slots.num_slots * slots.rank, fan_in, dtype=dtype, device=device)
        self.Bt = torch.zeros(slots.num_slots * slots.rank, fan_out, dtype=dtype, device=device)
        self.f32_gemv = False  # set by LoRASlots.hook for the F32_GEMV projections

    def set(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> None:
        """Slot `slot` ← lora_A [r, in], lora_B [out, r] (None: this adapter leaves the projection alone)."""
        R = self.slots.rank
        rows = slice(slot * R, (slot + 1) * R)
        self.A[rows].zero_()
        self.Bt[rows].zero_()
        if A is not None and B is not None:
            r = A.shape[0]
            self.A[slot * R: slot * R + r] = A.to(self.A.dtype)
            self.Bt[slot * R: slot * R + r] = (B.float().t() * scale).to(self.Bt.dtype)

    def kernel_path(self, rows: int) -> bool:
        """Whether a forward of `rows` rows takes our kernels (else torch's GEMMs)."""
        if rows > KERNEL_ROWS or self.A.device.type != "cpu" or not kernels.available():
            return False
        return self.A.dtype == torch.bfloat16 or (self.A.dtype == torch.float32 and self.f32_gemv)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        fast = self.kernel_path(x.numel() // self.fan_in)
        mask = self.slots.mask(x, torch.float32 if fast else self.A.dtype)
        if mask is None:
            return None
        n = mask.shape[1]  # slots up to the highest in use
        x2 = x.reshape(-1, self.fan_in).to(self.A.dtype)
        if not fast:
            y = (F.linear(x2, self.A[:n]) * mask) @ self.Bt[:n]
        else:
            # fp32 (DeltaNet's a/b): torch's GEMM; gemv_f32's plain loop is for a handful of outputs, not S·R
            t = gemv.gemv_bf16(x2, self.A[:n]) if self.A.dtype == torch.bfloat16 else F.linear(x2, self.A[:n])
            y = gemv.lora_expand(t, mask, self.Bt[:n])
        return y.to(x.dtype).view(*x.shape[:-1], self.fan_out)


class LoRASlots:
    """`num_slots` adapter slots of rank ≤ `rank` over a model's projections, and the current forward's rows."""

    def __init__(self, num_slots: int, rank: int):
        if num_slots < 1:
            raise ValueError(f"max_loras must be at least 1, not {num_slots}")
        self.num_slots, self.rank = num_slots, rank
        self.hooks: dict[str, SlotDelta] = {}  # module name → its hook
        self._default: int | None = None
        self._seq_slots: list[int] | None = None
        self._masks: dict[tuple[int, torch.dtype], torch.Tensor | None] = {}

    @property
    def default(self) -> int | None:
        """The slot of forwards no `use` covers (None: no adapter): weights/lora.py `apply_lora`'s."""
        return self._default

    @default.setter
    def default(self, slot: int | None) -> None:
        self._default, self._masks = slot, {}

    @property
    def active(self) -> bool:
        """Whether the current forward has any row with an adapter (then the fused layers add the deltas)."""
        if self._seq_slots is not None:
            return any(s != NONE for s in self._seq_slots)
        return self.default is not None

    @contextmanager
    def use(self, seq_slots: list[int]) -> Iterator[None]:
        """Run the forward inside with sequence i on slot seq_slots[i] (NONE: no adapter)."""
        prev, prev_masks = self._seq_slots, self._masks
        self._seq_slots, self._masks = list(seq_slots), {}
        try:
            yield
        finally:
            self._seq_slots, self._masks = prev, prev_masks

    def mask(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The [rows, S·R] 0/1 mask of x's rows (S: slots up to the highest in use), built once per forward."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        key = (rows, dtype)
        if key not in self._masks:
            self._masks[key] = self._build(rows, x.shape[0] if x.dim() > 1 else 1, dtype, x.device)
        return self._masks[key]

    def _build(self, rows: int, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        seqs = self._seq_slots if self._seq_slots is not None else (
            None if self.default is None else [self.default] * batch)
        if seqs is None or all(s == NONE for s in seqs) or rows == 0:
            return None
        if rows % len(seqs):
            raise RuntimeError(f"LoRA rows: {rows} rows for {len(seqs)} sequences")
        per_row = torch.tensor(seqs, device=device).repeat_interleave(rows // len(seqs))
        cols = torch.arange((max(seqs) + 1) * self.rank, device=device) // self.rank
        return (per_row[:, None] == cols[None, :]).to(dtype)

    def hook(self, model: nn.Module, name: str) -> SlotDelta:
        """The hook of module `name`, made (and set as its delta) on first use."""
        h = self.hooks.get(name)
        if h is None:
            mod = model.get_submodule(name)
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.dtype.is_floating_point:
                dtype, device = w.dtype, w.device
            else:  # a QuantLinear: its activations' dtype
                dtype, device = getattr(mod, "dtype"), mod._device()  # type: ignore[operator]
            h = self.hooks[name] = SlotDelta(self, int(getattr(mod, "in_features")),
                                             int(getattr(mod, "out_features")), dtype, device)
            h.f32_gemv = name.rpartition(".")[2] in F32_GEMV
            setattr(mod, "delta", h)
        return h


def slots_of(model: nn.Module, num_slots: int = 1, rank: int = 0) -> LoRASlots:
    """The model's `LoRASlots`, made with at least `num_slots` slots of rank ≥ `rank` (an existing one is rebuilt
    bigger, keeping nothing loaded: weights/lora.py and engine/adapters.py reload what they hold)."""
    cur: LoRASlots | None = model.__dict__.get("lora_slots")
    if cur is not None and cur.num_slots >= num_slots and cur.rank >= rank:
        return cur
    if cur is not None:
        num_slots, rank = max(num_slots, cur.num_slots), max(rank, cur.rank)
        clear(model)
    slots = LoRASlots(num_slots, rank)
    model.__dict__["lora_slots"] = slots
    for layer in _layers(model):
        layer.__dict__["lora_slots"] = slots  # read by DecoderLayer.forward: an active slot skips the fused path
    return slots


def clear(model: nn.Module) -> None:
    """Take every adapter hook off `model`: the base model again."""
    slots: LoRASlots | None = model.__dict__.pop("lora_slots", None)
    if slots is None:
        return
    for name in slots.hooks:
        setattr(model.get_submodule(name), "delta", None)
    for layer in _layers(model):
        layer.__dict__.pop("lora_slots", None)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_type")]
