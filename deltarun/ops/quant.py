"""Weight-only quantization: the int8 / int4 formats, their plain dequantization, and fast matmuls.

Formats (what quantized folders store, per quantized Linear `X`, and what GGUF tensors map onto):
- int8, per output channel, symmetric: `X.qweight` int8 [N, K], `X.scales` [N]; w = q · scale.
- int4, group-wise along K, asymmetric: `X.qweight` uint8 [N, K/2] (two values per byte, the even
  column in the low nibble), `X.scales` and `X.zeros` [N, K/group]; w = (q − 8) · scale + zero with
  q ∈ 0…15. This is the affine form of torch's int4 kernels, and GGUF's Q4_0 (zero = 0) and Q4_K
  (zero = 8·scale − min) map onto it exactly.
The matmuls use torch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm[_for_cpu]`; int8
on the CPU: ops/gemv.py's kernel for decode rows where it is built),
which read the small weights once per call; every kernel path is checked against the dequantized
reference when a layer is packed, and falls back to it (dequantize + F.linear) where a kernel is
missing or disagrees. Activations and outputs stay in the model dtype. Nothing here knows layer names.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv, kernels
from .int4_layout import UNPAIRS, UNQUADS, cpu_int4_block, cpu_layout_from_portable, int4_reorder
from .memory import weight_empty
from .routes import first
from .settings import settings

BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP = 64  # int4: 4.5 bits/weight with bf16 scale+zero; 32 is closer to bf16, 128 smaller


# ------------------------------------------------------------------ quantize / dequantize (reference)
ROW_BLOCK = 8192  # rows dequantized at a time: bounds the fp32 temporaries of a 248K-row lm_head
# rows quantized at a time: fp32 temporaries of ≤ 2 MB at K = 1024, which glibc reuses block after block. Whole
# weights (up to 8192 rows, 32 MB) left freed space between the quantized tensors: in some runs the heap grew by
# 0.8 GB over a 0.8B int8 load (peak RSS 1.85 GB against 1.02).
QUANT_ROW_BLOCK = 512


def _by_rows(fn, pages=torch.empty):
    """Apply a row-wise quantizer in blocks of rows and concatenate its outputs; `release(block)` is called on
    each block of w once it is quantized (weights/common.py `drop_pages`: a mapped checkpoint's pages go back
    as they are read, not after the whole 248K-row embedding). `pages(shape, dtype)` allocates the outputs."""
    def wrapped(w: torch.Tensor, *args, release=None):
        if w.shape[0] <= QUANT_ROW_BLOCK:
            return fn(w, *args)
        outs: tuple[torch.Tensor, ...] = ()
        for i in range(0, w.shape[0], QUANT_ROW_BLOCK):
            part = fn(w[i:i + QUANT_ROW_BLOCK], *args)
            if not outs:  # written block by block: a torch.cat of the parts would hold the result twice
                outs = tuple(pages((w.shape[0], *p.shape[1:]), dtype=p.dtype) if p.device.type == "cpu"
                             else p.new_empty((w.shape[0], *p.shape[1:])) for p in part)
            for o, p in zip(outs, part):
                o[i:i + QUANT_ROW_BLOCK] = p
            if release is not None:
                release(w[i:i + QUANT_ROW_BLOCK])
        return outs
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] → (q int8 [N, K], scales fp32 [N] with bf16-exact values), symmetric per row."""
    w = w.float()
    scales = _bf16((w.abs().amax(dim=1) / 127).clamp(min=1e-12))
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


# int8 weights on 2 MB pages (ops/memory.py): decode +5%, prefill +8% (0.8B, fresh processes); the int4 kernel
# layout on them lost ~9% of prefill and gained nothing in decode, so int4 stays on ordinary pages
quantize_int8 = _by_rows(_quantize_int8, pages=weight_empty)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16-representable values: scales are stored in bf16, so q is chosen against those."""
    return x.to(torch.bfloat16).float()


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def _quantize_int4(w: torch.Tensor, group: int = DEFAULT_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] → (q uint8 [N, K] in 0…15, scales, zeros fp32 [N, K/g] with bf16-exact values), min-max
    per group."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group}")
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = _bf16(((hi - lo) / 15).clamp(min=1e-12))
    zeros = _bf16(lo + 8 * scales)
    q = (wg - zeros[..., None]).div_(scales[..., None]).add_(8).round_().clamp_(0, 15).to(torch.uint8)  # in place
    return q.reshape(n, k), scales, zeros


quantize_int4 = _by_rows(_quantize_int4)


@_by_rows
def quantize_int4_packed(w: torch.Tensor, group: int = DEFAULT_GROUP) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """`quantize_int4` with q packed two to a byte ([N, K/2], `pack_int4`) block by block: quantizing a 248K-row
    embedding never holds its [N, K] bytes (0.25 GB for 0.8B)."""
    q, scales, zeros = _quantize_int4(w, group)
    return pack_int4(q), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] (0…15) → [N, K/2], even columns in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] → uint8 [N, K] (0…15)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Portable int4 [N, K/2] with scales/zeros [N, K/g] → fp32 [N, K]."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    g = k // scales.shape[1]
    w = (q.reshape(n, -1, g) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(n, k)


# ------------------------------------------------------------------ modules
PREFILL_ROWS = 16  # from this many rows an integer prefill GEMM (where built) beats the weight-only kernels on CPU
# Where no integer GEMM is built (int4 on AVX-512 without VNNI), the int4 kernel in blocks of 16 rows still beats
# dequantizing the weight up to here: [3584, 1024] at 16 rows 0.46 vs 2.6 ms, at 128 rows 3.7 vs 4.7 ms (2-core
# Zen 4); batched decode of 16–128 sequences would otherwise dequantize every weight at every step
KERNEL_BLOCK_ROWS = 128
class QuantLinear(nn.Module):
    """A bias-free Linear with int8 or int4 weights. forward: x [..., K] → [..., N] in x's dtype.

    Buffers keep the portable format (above) until `pack()` lays them out for the device's kernel;
    `dtype` is the activation/scale dtype the kernels run in. Few rows (decode) go through the
    weight-only kernel; many rows (prefill) dequantize once per call and use the dtype's matmul.
    """

    # The portable buffers; None once a packed kernel copy (CPU int4) or a shared table holds the weights.
    qweight: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    delta: Callable[[torch.Tensor], torch.Tensor | None] | None = None  # an adapter's output (ops/lora.py)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = DEFAULT_GROUP,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else in_features
        self.dtype = dtype
        n, k = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(n, dtype=dtype, device=device))
        else:
            self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(n, k // self.group_size, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.empty(n, k // self.group_size, dtype=dtype, device=device))
        self._kernel: _Kernel | None = None  # set by pack(): a callable x2d → y2d, or None for the reference path
        # (CPU-packed int4, sz [K/g, N, 2], the byte order within its row blocks: int4_layout.int4_reorder)
        self._cpu4: tuple[torch.Tensor, torch.Tensor, int] | None = None
        # set by pack(): the integer prefill matmul (csrc/qgemm.cpp), x2d → y2d, or None
        self._gemm: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.routes = {"decode": "dequant", "prefill": "dequant"}  # ops/routes.py names, set by pack()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP,
                   dtype: torch.dtype = torch.bfloat16) -> "QuantLinear":
        n, k = weight.shape
        mod = cls(k, n, bits, group_size, dtype, device="meta")
        if bits == 8:
            q, s = quantize_int8(weight)
            mod.set_int8(q, s)
        else:
            q, s, z = quantize_int4(weight, group_size)
            mod.set_int4(pack_int4(q), s, z)
        return mod

    def set_int8(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        self.qweight, self.scales = q.to(torch.int8), scales.to(self.dtype)

    def set_int4(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        self.qweight, self.scales, self.zeros = packed.to(torch.uint8), scales.to(self.dtype), zeros.to(self.dtype)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows idx [R] → [R, K] in fp32 (an embedding lookup, or all rows)."""
        if self.bits == 8:
            assert self.qweight is not None and self.scales is not None  # only a CPU-packed int4 weight drops them
            return self.qweight[idx].float() * self.scales[idx].float()[:, None]
        if self._cpu4 is None:
            assert self.qweight is not None and self.scales is not None and self.zeros is not None
            return dequantize_int4(self.qweight[idx], self.scales[idx], self.zeros[idx])
        packed, sz, order = self._cpu4
        k, blk = self.in_features, cpu_int4_block()
        within = idx % blk
        j = (within % (blk // 2)).cpu()
        if order == 1:  # where torch's bytes (column k, block row j) and (k + 1, j) sit among a pair's 32
            at = torch.stack((UNPAIRS[j], UNPAIRS[16 + j]), dim=-1).to(idx.device)  # [R, 2]
            sel = packed.view(-1, k // 2, 32)[(idx // blk)[:, None], :, at]  # [R, 2, K/2]
            sel = sel.transpose(1, 2).reshape(len(idx), k)  # [R, K]
        elif order == 2:  # torch's bytes (k … k + 3, j) among 4 columns' 128
            at = UNQUADS[(torch.arange(4) * 32)[None, :] + j[:, None]].to(idx.device)  # [R, 4]
            sel = packed.view(-1, k // 4, 128)[(idx // blk)[:, None], :, at]  # [R, 4, K/4]
            sel = sel.transpose(1, 2).reshape(len(idx), k)
        else:
            sel = packed.view(-1, k, blk // 2)[idx // blk, :, j.to(idx.device)]  # [R, K]
        q = torch.where((within < blk // 2)[:, None], sel & 15, sel >> 4).float()
        g = self.group_size
        scale, zero = sz[:, idx, 0].t().float(), sz[:, idx, 1].t().float()  # [R, K/g]
        return ((q.view(len(idx), -1, g) - 8) * scale[..., None] + zero[..., None]).view(len(idx), k)

    def row_block(self, start: int, end: int) -> torch.Tensor:
        """Rows start … end−1 dequantized [end−start, K] in fp32, read in order (no gather) — what a
        prefill matmul needs; `start`/`end` multiples of 64 (or end = N). On the CPU one pass in C++
        (ops/csrc/dequant.cpp), else `row_block_reference`."""
        if self._device().type == "cpu" and kernels.available():
            blk = cpu_int4_block()
            if self.bits == 8:
                assert self.qweight is not None and self.scales is not None
                return gemv.dequant_int8_rows(self.qweight, self.scales, start, end)
            if self._cpu4 is not None and not (start % blk or end % blk):
                packed, sz, order = self._cpu4
                return gemv.dequant_int4_rows(packed, sz, self.group_size, blk, start, end, order)
        return self.row_block_reference(start, end)

    def row_block_reference(self, start: int, end: int) -> torch.Tensor:
        """`row_block` in torch ops."""
        blk = cpu_int4_block()
        if self._cpu4 is None or start % blk or end % blk:
            return self.rows(torch.arange(start, end, device=self._device()))
        packed, sz, order = self._cpu4
        k = self.in_features
        if order == 1:
            p = packed.view(-1, k // 2, 32)[start // blk: end // blk][..., UNPAIRS].reshape(-1, k, blk // 2)
        elif order == 2:
            p = packed.view(-1, k // 4, 128)[start // blk: end // blk][..., UNQUADS].reshape(-1, k, blk // 2)
        else:
            p = packed.view(-1, k, blk // 2)[start // blk: end // blk]  # [nb, K, B/2]
        q = torch.cat((p & 15, p >> 4), dim=-1).transpose(1, 2).reshape(end - start, k)  # rows n%B < B/2 low
        g = self.group_size
        scale, zero = sz[:, start:end, 0].t().float(), sz[:, start:end, 1].t().float()
        return ((q.view(end - start, -1, g).float() - 8) * scale[..., None] + zero[..., None]).view(end - start, k)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in fp32."""
        return self.row_block(0, self.out_features)

    def _device(self) -> torch.device:
        if self.qweight is None:
            assert self._cpu4 is not None  # dropped for the CPU-packed copy
            return self._cpu4[0].device
        return self.qweight.device

    def portable(self) -> dict[str, torch.Tensor]:
        """The buffers in the saved (portable) format."""
        names = ("qweight", "scales") if self.bits == 8 else ("qweight", "scales", "zeros")
        return {n: getattr(self, n) for n in names}

    def pack(self) -> None:
        """Lay the weights out for this device's kernel; keep the reference path if the kernel is
        unavailable or disagrees with it on a probe input (checked on a sample of output rows, so
        that a 248K-row lm_head is never dequantized whole). The probe runs for the first weight of each
        shape and kernel in a process (`_VERDICTS`): ~2 ms of small torch ops per weight, which for all 151
        weights of the 0.8B model was a third of a saved int4 folder's load."""
        dev = self._device()
        n = self.out_features
        try:
            kernel = _int8_kernel(self) if self.bits == 8 else _int4_kernel(self)
        except (RuntimeError, NotImplementedError):
            return
        gemm = _gemm(self, kernel)
        cpu4 = self.bits == 4 and dev.type == "cpu" and bool(cpu_int4_block()) and n % cpu_int4_block() == 0
        key = (self.bits, self.in_features, n, self.group_size, self.dtype, str(dev), kernel.name, kernel.order,
               cpu_int4_block(), gemm is not None, cpu4)
        if key not in _VERDICTS:
            _VERDICTS[key] = self._probe(kernel, gemm, cpu4)
        kernel_ok, gemm_ok, layout_ok = _VERDICTS[key]
        if not kernel_ok:
            return
        self._kernel = kernel
        self.routes = {"decode": kernel.name, "prefill": "dequant"}
        if gemm is not None and gemm_ok:
            self._gemm = gemm
            self.routes["prefill"] = f"qgemm_int{self.bits}"
        elif kernel.name == "gemv_int4":  # what `forward` does without an integer GEMM
            self.routes["prefill"] = f"gemv_int4 to {KERNEL_BLOCK_ROWS} rows, then dequant"
        if cpu4 and layout_ok:
            assert kernel.sz is not None  # an int4 kernel's last argument
            self._cpu4 = kernel.packed, kernel.sz, kernel.order
            self.qweight = self.scales = self.zeros = None  # the kernel's copy is the only one

    def _probe(self, kernel: _Kernel, gemm, cpu4: bool) -> tuple[bool, bool, bool]:
        """(kernel agrees, integer GEMM agrees, our reading of the CPU int4 layout holds) on this weight."""
        dev = self._device()
        probe = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0)).to(dev, self.dtype)
        n = self.out_features
        idx = torch.unique(torch.cat([torch.arange(min(n, 128)), torch.arange(max(0, n - 64), n),
                                      torch.randint(0, n, (64,), generator=torch.Generator().manual_seed(1))])).to(dev)
        portable = self.rows(idx)
        want = F.linear(probe.float(), portable)
        tol = 2e-2 if self.dtype != torch.float32 else 1e-3
        kernel_ok = _probe_ok(kernel, probe, want, idx, tol)
        gemm_ok = kernel_ok and gemm is not None and _probe_ok(gemm, probe, want, idx, tol)
        layout_ok = False
        if kernel_ok and cpu4:
            assert kernel.sz is not None
            self._cpu4 = kernel.packed, kernel.sz, kernel.order
            layout_ok = torch.equal(self.rows(idx), portable)
            self._cpu4 = None
        return kernel_ok, gemm_ok, layout_ok

    def first_rows(self, n: int) -> "QuantLinear | None":
        """Rows 0 … n−1 as a QuantLinear of their own that reads this one's packed tensors (views: nothing copied
        but int4's scale/zero pairs, 2 MB for 32K rows of K = 1024), bit for bit the same weights; None where this
        weight is not packed for a kernel whose layout keeps rows apart (then re-quantize its rows instead)."""
        k = self._kernel
        if k is None or not 0 < n < self.out_features or self.delta is not None:
            return None
        mod = QuantLinear(self.in_features, n, self.bits, self.group_size, self.dtype, device="meta")
        if self.bits == 8 and k.name in ("gemv_int8", "int8pack") and self.scales is not None:
            mod._kernel = _Kernel(k.name, k.op, k.packed[:n], *(a[:n] for a in k.args))
            mod.qweight, mod.scales, mod.zeros = k.packed[:n], self.scales[:n], None
        elif self.bits == 4 and self._cpu4 is not None and n % cpu_int4_block() == 0 and k.sz is not None:
            packed = k.packed.view(-1)[: n * self.in_features // 2].view(n, -1)  # whole row blocks: a prefix
            sz = k.sz[:, :n].contiguous()
            mod._kernel = _Kernel(k.name, k.op, packed, self.group_size, sz)
            mod._kernel.order = k.order
            mod._cpu4 = packed, sz, k.order
            mod.qweight = mod.scales = mod.zeros = None
        else:
            return None
        mod._gemm = _gemm(mod, mod._kernel) if self._gemm is not None else None
        mod.routes = dict(self.routes)
        return mod

    def decode_tensors(self) -> list[torch.Tensor] | None:
        """The tensors its decode kernel reads, in csrc/layer.cpp's encoding ([q, fp32 scales] for int8,
        [packed, sz] for int4), or None where decode does not run on our kernels."""
        k = self._kernel
        if k is None or k.name not in ("gemv_int8", "gemv_int4"):
            return None
        if k.name == "gemv_int8":
            return [k.packed, *k.args]
        assert k.sz is not None
        return [k.packed, k.sz]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.dtype).contiguous()
        rows = x2.shape[0]
        if self._kernel is not None and rows < PREFILL_ROWS:
            y = self._kernel(x2)
        elif (self._gemm is None and self._kernel is not None and self._kernel.name == "gemv_int4"
              and rows <= KERNEL_BLOCK_ROWS):  # one row's output never depends on the others: same values
            y = torch.cat([self._kernel(x2[i:i + gemv.MAX_KERNEL_ROWS]) for i in range(0, rows, gemv.MAX_KERNEL_ROWS)])
        elif self._gemm is not None and x2.dtype != torch.float32:  # fp32 activations: exact products below
            y = self._gemm(x2)
        else:  # dequantize in row blocks: never a whole fp32 copy of a large matrix
            n = self.out_features
            # without hardware bf16 matmul the rows stay fp32 (ops/kernels.py `native_bf16_matmul`)
            widen = x2.device.type == "cpu" and x2.dtype == torch.bfloat16 and not kernels.native_bf16_matmul()
            xm, wt = (x2.float(), torch.float32) if widen else (x2, self.dtype)
            y = torch.cat([F.linear(xm, self.row_block(i, min(i + ROW_BLOCK, n)).to(wt))
                           for i in range(0, n, ROW_BLOCK)], dim=-1).to(self.dtype)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        d = None if self.delta is None else self.delta(x)
        return y if d is None else y + d

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"


# QuantLinear.pack's probe verdicts by weight shape and kernel: (kernel, integer GEMM, CPU int4 layout) agree
_VERDICTS: dict[tuple, tuple[bool, bool, bool]] = {}


class _Kernel:
    """A packed weight and the op that multiplies by it (keeps the packed tensors reachable)."""

    def __init__(self, name: str, op, packed: torch.Tensor, *args):
        self.name, self.op, self.packed, self.args = name, op, packed, args  # name: ops/routes.py
        self.sz: torch.Tensor | None = args[-1] if args else None  # int4: scales and zeros [K/g, N, 2]
        self.order = 0  # int4: the byte order within row blocks (int4_layout.int4_reorder: 1 pairs, 2 quads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.packed, *self.args)


def _gemm(mod: QuantLinear, kernel: _Kernel):
    """The integer prefill matmul for a CPU weight packed for our decode kernel (csrc/qgemm.cpp: int8 weights
    with the decode kernel's 16-bit activations, int4 in the AVX2 pairs or AVX-512 VNNI quads layout with int8
    activations per group), or None where it does not apply (then prefill dequantizes for torch's GEMM);
    `DELTARUN_PREFILL_GEMM=0` turns it off. The conditions of ops/routes.py's prefill rows."""
    on = settings().prefill_gemm and kernel.packed.device.type == "cpu"
    if mod.bits == 8:
        q, scales = kernel.packed, kernel.args[0]
        ok = on and kernel.name == "gemv_int8" and mod.in_features % 32 == 0
        return (lambda x: gemv.qgemm_int8(x, q, scales)) if first("int8", "prefill", {"qgemm_int8": ok}) != "dequant" \
            else None
    packed, g, sz = kernel.packed, mod.group_size, kernel.sz
    assert sz is not None
    ok = on and kernel.name == "gemv_int4" and kernel.order != 0 and g % 32 == 0 and kernels.has_qgemm_int4()
    return (lambda x: gemv.qgemm_int4(x, packed, g, sz)) if first("int4", "prefill", {"qgemm_int4": ok}) != "dequant" \
        else None


def _probe_ok(op, probe: torch.Tensor, want: torch.Tensor, idx: torch.Tensor, tol: float) -> bool:
    """Whether op(probe) matches the dequantized reference `want` on the sampled output columns idx."""
    try:
        got = op(probe).float()[:, idx]
    except (RuntimeError, NotImplementedError):
        return False
    return torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


def _int8_kernel(mod: QuantLinear) -> _Kernel:
    qw, sc = mod.qweight, mod.scales
    assert qw is not None and sc is not None  # packing reads the portable buffers
    ours = qw.device.type == "cpu" and kernels.available()
    if first("int8", "decode", {"gemv_int8": ours}) == "gemv_int8":  # fp32 scales: what the kernel multiplies by
        return _Kernel("gemv_int8", gemv.int8_mm, qw.contiguous(), sc.float().contiguous())
    return _Kernel("int8pack", torch.ops.aten._weight_int8pack_mm, qw.contiguous(), sc.contiguous())


def _int4_kernel(mod: QuantLinear) -> _Kernel:
    qw, sc, zr = mod.qweight, mod.scales, mod.zeros
    assert qw is not None and sc is not None and zr is not None  # packing reads the portable buffers
    sz = torch.stack((sc, zr), dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
    g, n = mod.group_size, mod.out_features
    if qw.device.type == "cpu":  # a row block at a time: an int32 copy of a 248K-row matrix is 1 GB
        ours = first("int4", "decode", {"gemv_int4": gemv.int4_usable(sz)}) == "gemv_int4"
        order = kernels.int4_order() if ours else 0  # our kernels read row blocks in their own byte order
        blk = cpu_int4_block()
        if blk and n % blk == 0 and kernels.available():  # one pass in C++
            packed = gemv.repack_int4(qw.contiguous(), blk, order)
        elif blk and n % blk == 0:  # our own repack of the portable bytes, into one buffer (no cat of blocks)
            packed = torch.empty_like(qw)
            for i in range(0, n, ROW_BLOCK):
                block = cpu_layout_from_portable(qw[i:i + ROW_BLOCK], blk)
                packed[i:i + ROW_BLOCK] = int4_reorder(block, order)
        else:
            packed = _cpu_pack(unpack_int4(qw), order)
        kernel = (_Kernel("gemv_int4", gemv.int4_mm, packed, g, sz) if ours else
                  _Kernel("int4pack", torch.ops.aten._weight_int4pack_mm_for_cpu, packed, g, sz))
        kernel.order = order
        return kernel
    # CUDA (tinygemm): nibbles high-first, inner_k_tiles = 8
    q = unpack_int4(qw)
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).contiguous(), 8)
    return _Kernel("int4pack", torch.ops.aten._weight_int4pack_mm, packed, g, sz)


def _cpu_pack(q: torch.Tensor, order: int) -> torch.Tensor:
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return int4_reorder(packed, order)


class QuantEmbedding(QuantLinear):
    """Token embedding gathered from int8 / int4 rows: ids [...] → [..., H] in `dtype`.

    Same buffers as a QuantLinear [V, H]; a tied embedding reads its rows from the lm_head's
    (possibly kernel-packed) copy instead (`share`), so the table is held once.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int = DEFAULT_GROUP,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__(embedding_dim, num_embeddings, bits, group_size, dtype, device)
        self.embedding_dim = embedding_dim
        self._source: QuantLinear | None = None
        self.routes = {}  # an embedding gathers rows: no matmul route

    def pack(self) -> None:
        pass

    def share(self, source: QuantLinear) -> None:
        self._source = source
        self.qweight = self.scales = self.zeros = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self._source or self
        rows = QuantLinear.rows(table, ids.reshape(-1))
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)
