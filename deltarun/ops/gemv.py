"""Fast decode matmuls on the CPU (csrc/gemv.cpp), built on first use, with F.linear as the reference.

Decode multiplies one token per sequence by every weight: memory-bound, and torch's bf16 `F.linear`
streams weights at roughly half the machine's bandwidth for so few rows. The kernel here reads each
weight row once for up to 16 activation rows (bf16 weights; int8 weights with a per-row scale and int4
in torch's CPU layout, used by ops/quant.py), with AVX-512 (BF16/VNNI where present) or AVX2+FMA inner
loops. It is compiled for this machine (-march=native, or the lower level `DELTARUN_CPU_LEVEL` names) by
torch's extension builder into ~/.cache/deltarun/kernels (or $DELTARUN_KERNELS_DIR) the first time a model
loads on the CPU (~20 s, once), and is optional: without a compiler, with `DELTARUN_CPU_KERNELS=0`, or if
its self-check against F.linear fails, everything runs on torch's own ops. The same extension holds the
prefill-side CPU ops (the integer GEMM for quantized weights, the conv and the chunked delta rule:
csrc/qgemm.cpp, conv.cpp, gdn_chunk.cpp) and, where bf16 matmul is emulated, the bf16-weight GEMM
(csrc/fgemm.cpp, `linear_bf16w`; else `linear_via_fp32`, widened to fp32 for oneDNN).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .int4_layout import cpu_int4_block, int4_pairs

log = logging.getLogger(__name__)
MAX_ROWS = 4  # measured: up to 4 rows the kernel wins (1.8× at one row); from 8, F.linear's GEMM is as fast
SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
# one extension: matmuls, the DeltaNet step, norms, dequantization, whole decode layers
SOURCES = ("gemv.cpp", "gdn.cpp", "norm.cpp", "dequant.cpp", "layer.cpp", "qgemm.cpp", "conv.cpp", "gdn_chunk.cpp",
           "fgemm.cpp")
STALE_LOCK_S = 300  # a first build takes ~30 s
_state: dict[str, object] = {}
# `DELTARUN_CPU_LEVEL`: build for, and route as, a lower x86 level than this CPU's, so the kernels and
# fallbacks of the other CPU classes run (and are tested) here; `ATEN_CPU_CAPABILITY` set to match makes
# torch's own kernels (and its int4 layout) follow. level: (compiler flags, CPU flags needed, hardware bf16)
LEVELS = {
    "avx2": (["-march=haswell"], {"avx2", "fma"}, False),
    "avx512": (["-march=cascadelake"], {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, False),
    "avx512_bf16": (["-march=cascadelake", "-mavx512bf16", "-mavx512vbmi"],
                    {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "avx512_bf16"}, True),
}


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (/proc/cpuinfo), None where they cannot be read."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((set(ln.split(":", 1)[1].split()) for ln in info.splitlines()
                 if ln.startswith(("flags", "Features"))), None)


def cpu_level() -> str | None:
    """The level asked for by `DELTARUN_CPU_LEVEL` (None: this CPU's own, -march=native). A level this CPU
    cannot run, or an unknown one, is an error."""
    level = os.environ.get("DELTARUN_CPU_LEVEL", "").strip().lower() or None
    if level is None or level == "native":
        return None
    if level not in LEVELS:
        raise ValueError(f"DELTARUN_CPU_LEVEL={level!r}: expected one of native, {', '.join(LEVELS)}")
    missing = LEVELS[level][1] - (_cpu_flags() or set())
    if missing:
        raise ValueError(f"DELTARUN_CPU_LEVEL={level}: this CPU lacks {', '.join(sorted(missing))}")
    return level


def _march() -> list[str]:
    level = cpu_level()
    return ["-march=native"] if level is None else LEVELS[level][0]


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags, the target level and torch's version: a build made for another
    CPU (a shared home directory), another level or another torch is never loaded."""
    flags = " ".join(sorted(_cpu_flags() or ()))
    text = flags + " ".join(_march()) + torch.__version__ + "".join(
        f.read_text() for f in sorted(SOURCE.parent.iterdir()))
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def available() -> bool:
    """Build (once) and load the kernels; False where they cannot be used (then torch's ops run)."""
    if "ok" in _state:
        return bool(_state["ok"])
    _state["ok"] = False
    if (skip := _not_built()) is not None:
        if skip == "no compiler":
            log.info("no C++ compiler: CPU decode uses torch's matmuls")
        return False
    try:
        from torch.utils import cpp_extension

        root = os.environ.get("DELTARUN_KERNELS_DIR") or Path.home() / ".cache" / "deltarun" / "kernels"
        build = Path(root) / _cpu_tag()
        build.mkdir(parents=True, exist_ok=True)
        lock = build / "lock"  # torch's build lock: one left by a build that was killed would block forever
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        if not (build / "deltarun_gemv.so").exists():
            print("deltarun: building the CPU kernels for this machine (once, ~30 s) …", file=sys.stderr, flush=True)
        cpp_extension.load(name="deltarun_gemv", sources=[str(SOURCE.with_name(f)) for f in SOURCES],
                           build_directory=str(build),
                           extra_cflags=["-O3", *_march(), "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
        _state["ok"] = _self_check()
    except Exception as e:  # a missing ninja, a compiler error, …: the torch path still works
        _state["error"] = str(e)
        log.warning("CPU decode kernels unavailable (%s): using torch's matmuls", str(e).splitlines()[0][:200])
    else:
        if not _state["ok"]:
            _state["error"] = "built, but the self-check against F.linear failed"
    return bool(_state["ok"])


def _not_built() -> str | None:
    """"off" (`DELTARUN_CPU_KERNELS=0`) or "no compiler" where the kernels are not to be built, else None."""
    if os.environ.get("DELTARUN_CPU_KERNELS", "1") == "0":
        return "off"
    if not (shutil.which("c++") or shutil.which("g++")) or sys.platform == "win32":
        return "no compiler"
    return None


def unavailable_reason() -> str | None:
    """Why `available()` is False: None where the kernels loaded; "off" / "no compiler" where they were not
    to be built; otherwise the build or self-check error (tests fail on it rather than skip)."""
    if available():
        return None
    return _not_built() or str(_state.get("error", "unknown"))


def _self_check() -> bool:
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 70, 96), (5, 257, 64), (16, 33, 48)):
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        xb, wb = x.bfloat16(), w.bfloat16()
        ref = F.linear(xb.float(), wb.float())
        if not torch.allclose(torch.ops.deltarun.gemv_bf16(xb, wb), ref, rtol=1e-3, atol=1e-3):
            log.warning("CPU decode kernel disagrees with F.linear: not used")
            return False
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g)
        ref8, ref8b = F.linear(x, q.float() * s[:, None]), F.linear(xb.float(), q.float() * s[:, None])
        # fp32 activations: exact products; bf16 ones enter VNNI as 13-bit integers (within 1e-3 of the
        # output's scale, far below the bf16 rounding of the result)
        if not (torch.allclose(torch.ops.deltarun.gemv_int8(x, q, s), ref8, rtol=1e-4, atol=1e-3) and torch.allclose(
                torch.ops.deltarun.gemv_int8(xb, q, s), ref8b, rtol=0, atol=1e-3 * ref8b.abs().max().item())):
            log.warning("CPU int8 decode kernel disagrees with F.linear: not used")
            return False
    _state["int4"] = _int4_check(g)
    _state["bf16w"] = _bf16w_check(g)
    return True


def _bf16w_check(g: torch.Generator) -> bool:
    """The bf16-weight prefill GEMM against F.linear in fp32, on shapes with every remainder (rows of the
    6-row tile, columns of the 16-wide panel, a K block and a partial one)."""
    if not torch.ops.deltarun.gemm_bf16w_available():
        return False
    x, w = torch.randn(13, 300, generator=g).bfloat16(), torch.randn(37, 300, generator=g).bfloat16()
    ref = F.linear(x.float(), w.float())
    if not torch.allclose(torch.ops.deltarun.gemm_bf16w(x, w), ref, rtol=1e-5, atol=1e-4):
        log.warning("CPU bf16-weight prefill GEMM disagrees with F.linear: not used")
        return False
    return True


def _int4_check(g: torch.Generator) -> bool:
    """The int4 kernel reads torch's CPU layout, whose row-block size follows torch's CPU capability:
    used only where this build reads the same layout and agrees with torch's int4 kernel."""
    if torch.ops.deltarun.int4_layout_rows() != cpu_int4_block():
        log.info("int4 decode kernel not built for torch's int4 layout here: torch's int4 kernel is used")
        return False
    q4 = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    ours = int4_pairs(packed) if cpu_int4_block() == 32 else packed
    sz = (torch.rand(2, 128, 2, generator=g) / 10).bfloat16()  # group 32
    x = torch.randn(3, 64, generator=g).bfloat16()
    ref4 = torch.ops.aten._weight_int4pack_mm_for_cpu(x.float(), packed, 32, sz.float())
    # fp32 activations: exact products; bf16 ones may enter as int8 per group (AVX2): within 3% of the scale
    if not (torch.allclose(torch.ops.deltarun.gemv_int4(x.float(), ours, 32, sz), ref4, rtol=1e-3, atol=1e-3)
            and torch.allclose(torch.ops.deltarun.gemv_int4(x, ours, 32, sz), ref4, rtol=0,
                               atol=0.03 * ref4.abs().max().item())):
        log.warning("CPU int4 decode kernel disagrees with torch's int4 kernel: not used")
        return False
    return True


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M ≤ 16, K] bf16 · w [N, K] bf16 → [M, N] fp32 (fp32 accumulation)."""
    return torch.ops.deltarun.gemv_bf16(x, w)


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M ≤ 16, K] · (q int8 [N, K] · scales [N]) → [M, N] fp32."""
    return torch.ops.deltarun.gemv_int8(x, q, scales)


def int4_usable(sz: torch.Tensor) -> bool:
    """Whether the int4 kernel multiplies a CPU weight with these (scale, zero) pairs ([K/g, N, 2] bf16)."""
    return sz.dtype == torch.bfloat16 and available() and bool(_state.get("int4"))


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """Weight-only int4 matmul by the kernel, x [M ≤ 16, K] → [M, N] in x's dtype. packed: torch's CPU layout
    [N/B, K, B/2], with each column pair in the kernel's order where B = 32 (AVX2, ops/int4_layout.py `int4_pairs`);
    sz [K/g, N, 2] bf16."""
    return torch.ops.deltarun.gemv_int4(x, packed, group, sz, True)


def qgemm_int4_available() -> bool:
    """Whether the integer int4 prefill matmul is built here (AVX2 without AVX-512: the 32-row pairs layout)."""
    return available() and bool(torch.ops.deltarun.qgemm_int4_available())


def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Weight-only int8 matmul for decode: the kernel up to 16 rows (it beats torch's at every row count
    measured), torch's beyond; x's dtype out."""
    if x.shape[0] <= 16:
        return torch.ops.deltarun.gemv_int8(x, q, scales, True)
    return torch.ops.aten._weight_int8pack_mm(x, q, scales.to(x.dtype))


def fused_norm(x: torch.Tensor) -> bool:
    """Whether x (a decode-sized CPU activation) takes the fused norm ops of csrc/norm.cpp."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and x.numel() <= 65536
            and not torch.is_grad_enabled() and available())


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86: AVX512-BF16 or AMX; Arm: BF16). Without
    it torch's bf16 GEMM is emulated: 18 GFLOP/s against 103 for the same product widened to fp32 first
    (2-core AVX2 EPYC, [512, 1024]·[1024, 3584]), so prefill-sized matmuls widen (`linear_via_fp32`)."""
    if "native_bf16" not in _state:
        try:
            level = cpu_level()
        except ValueError:
            level = None  # reported by `available()`
        flags = _cpu_flags()
        _state["native_bf16"] = (LEVELS[level][2] if level else
                                 flags is None or bool({"avx512_bf16", "amx_bf16", "bf16"} & flags))
    return bool(_state["native_bf16"])


def linear_bf16w(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for bf16 x [..., K] and w [N, K] on CPUs without hardware bf16 matmul: the
    products and fp32 sums of a bf16 GEMM, rounded once. csrc/fgemm.cpp's GEMM widens the weight while
    packing it (AVX2; `DELTARUN_PREFILL_GEMM=0` turns it off); elsewhere `linear_via_fp32`."""
    if (available() and _state.get("bf16w") and w.device.type == "cpu" and w.is_contiguous()
            and os.environ.get("DELTARUN_PREFILL_GEMM", "1") != "0"):
        y = torch.ops.deltarun.gemm_bf16w(x.reshape(-1, x.shape[-1]), w, bias is None).view(*x.shape[:-1], w.shape[0])
        return y if bias is None else (y + bias.float()).to(x.dtype)  # one rounding, after the bias
    return linear_via_fp32(x, w, bias)


def linear_via_fp32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for bf16 tensors computed in fp32 — the weight widened 8,192 rows at a time, so
    a 248K-row lm_head never has a whole fp32 copy — and rounded back to x's dtype: the same products and
    fp32 sums as a bf16 GEMM."""
    xf, b = x.float(), None if bias is None else bias.float()
    n = w.shape[0]
    if n <= WIDEN_ROWS:
        return _linear_f32(xf, _widened(w), b).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], n)
    for i in range(0, n, WIDEN_ROWS):
        bias_i = None if b is None else b[i:i + WIDEN_ROWS]
        out[..., i:i + WIDEN_ROWS] = _linear_f32(xf, _widened(w[i:i + WIDEN_ROWS]), bias_i)
    return out


def _linear_f32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear for fp32 CPU tensors through oneDNN's GEMM where torch has it (`DELTARUN_ONEDNN=0`: F.linear)."""
    if _state.get("onednn") is None:
        _state["onednn"] = torch.backends.mkldnn.is_available() and os.environ.get("DELTARUN_ONEDNN", "1") != "0"
    if _state["onednn"] and w.device.type == "cpu":
        try:
            # the weight stays a dense tensor: oneDNN reads it in place (to_mkldnn would copy it every call)
            y = torch._C._nn.mkldnn_linear(x.reshape(-1, x.shape[-1]).to_mkldnn(), w.contiguous(), None).to_dense()
            y = y.view(*x.shape[:-1], w.shape[0])
            return y if b is None else y + b
        except (RuntimeError, AttributeError):  # a torch without it: F.linear from now on
            _state["onednn"] = False
    return F.linear(x, w, b)


WIDEN_ROWS = 8192
WIDEN_REUSE = 1 << 26  # elements (256 MB fp32): larger widened weights get a fresh tensor
_scratch = threading.local()


def _widened(w: torch.Tensor) -> torch.Tensor:
    """w in fp32, copied into a scratch buffer reused across calls (one per thread): a fresh tensor per call
    costs its page faults, 11.6 against 2.5 ms for a 6144×1024 weight on a 2-core EPYC."""
    n = w.numel()
    if n > WIDEN_REUSE or w.device.type != "cpu":
        return w.float()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(w.shape).copy_(w)


class DecodeLinear(nn.Linear):
    """nn.Linear whose few-row calls (decode) use the bf16 kernel, and whose many-row calls widen to fp32
    on CPUs without hardware bf16 matmul; same parameters, same names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            if 0 < rows <= MAX_ROWS and available():
                y = torch.ops.deltarun.gemv_bf16(x.reshape(rows, -1), self.weight, True)
                if self.bias is not None:
                    y += self.bias
                return y.reshape(*x.shape[:-1], self.out_features)
            if rows > MAX_ROWS and not native_bf16_matmul():
                return linear_bf16w(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def accelerate(model: nn.Module) -> int:
    """Route the bf16 CPU nn.Linear calls of `model` through DecodeLinear (decode rows through the kernel,
    prefill rows through fp32 where bf16 matmul is not native); the module's class changes, weights stay
    untouched, so tying and state_dict stay as they were. Returns how many layers were switched."""
    mods = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
            and m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous()]
    if not mods or (not available() and native_bf16_matmul()):
        return 0
    for m in mods:
        m.__class__ = DecodeLinear
    return len(mods)
