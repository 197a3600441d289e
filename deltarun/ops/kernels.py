"""Building, loading and self-checking the CPU kernels (csrc/*.cpp): one extension, built on first use.

The extension is compiled for this machine (-march=native, or the lower level `DELTARUN_CPU_LEVEL` names) by
torch's extension builder into ~/.cache/deltarun/kernels (or $DELTARUN_KERNELS_DIR) the first time a model
loads on the CPU (~20 s, once), and is optional: without a compiler, with `DELTARUN_CPU_KERNELS=0`, or if
its self-check against F.linear fails, everything runs on torch's own ops. What it holds: the decode GEMVs
(bf16 / int8 / int4, ops/gemv.py), the DeltaNet step, norms, dequantization, whole decode layers
(ops/layer.py), the integer and bf16-weight prefill GEMMs, the conv and the chunked delta rule. Which of
them a linear uses is the route table's choice (ops/routes.py); this module says what is built here.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .int4_layout import cpu_int4_block, int4_reorder
from .settings import settings

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
# one extension: matmuls, the DeltaNet step, norms, dequantization, whole decode layers
SOURCES = ("gemv.cpp", "gdn.cpp", "norm.cpp", "dequant.cpp", "layer.cpp", "qgemm.cpp", "conv.cpp", "gdn_chunk.cpp",
           "fgemm.cpp", "lora.cpp", "gguf_blocks.cpp", "attn.cpp")
STALE_LOCK_S = 300  # a first build takes ~30 s
_state: dict[str, object] = {}
# `DELTARUN_CPU_LEVEL`: build for, and route as, a lower x86 level than this CPU's, so the kernels and
# fallbacks of the other CPU classes run (and are tested) here; `ATEN_CPU_CAPABILITY` set to match makes
# torch's own kernels (and its int4 layout) follow. level: (compiler flags, CPU flags needed, hardware bf16)
LEVELS = {
    "avx2": (["-march=haswell"], {"avx2", "fma"}, False),
    # AVX-512 without VNNI (Skylake-SP/X: the first AVX-512 Xeons, still in clouds): int4 dot products by vpmaddubsw
    "avx512_core": (["-march=skylake-avx512"], {"avx512f", "avx512bw", "avx512vl"}, False),
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
    level = settings().cpu_level
    if level is None or level == "native":
        return None
    if level not in LEVELS:
        raise ValueError(f"DELTARUN_CPU_LEVEL={level!r}: expected one of native, {', '.join(LEVELS)}")
    missing = LEVELS[level][1] - (_cpu_flags() or set())
    if missing:
        raise ValueError(f"DELTARUN_CPU_LEVEL={level}: this CPU lacks {', '.join(sorted(missing))}")
    return level


def _level_or_none() -> str | None:
    """`cpu_level()` for routing decisions: a bad `DELTARUN_CPU_LEVEL` counts as none (`available()` reports it)."""
    try:
        return cpu_level()
    except ValueError:
        return None


def _march() -> list[str]:
    level = cpu_level()
    return ["-march=native"] if level is None else LEVELS[level][0]


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags, the target level, torch's version and the sources (their
    content and their folder): a build made for another CPU (a shared home directory), another level or
    another torch is never loaded, and two copies of the sources (two checkouts or venvs) never share a build
    folder, where ninja, which compares paths and times, would rebuild each time the other one loads."""
    flags = " ".join(sorted(_cpu_flags() or ()))
    text = flags + " ".join(_march()) + torch.__version__ + str(SOURCE.parent.resolve()) + "".join(
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
        build = settings().kernels_dir / _cpu_tag()
        build.mkdir(parents=True, exist_ok=True)
        wait_for_build_lock(build / "lock")
        if not _load_built(build / "deltarun_gemv.so"):
            from torch.utils import cpp_extension

            if not (build / "deltarun_gemv.so").exists():
                print("deltarun: building the CPU kernels for this machine (once, ~30 s) …", file=sys.stderr,
                      flush=True)
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


def _load_built(lib: Path) -> bool:
    """Load a finished build straight away: the folder's tag already names these exact sources, flags and
    torch, so torch's extension loader (setuptools imported, ninja run to check the build: 0.1 s of every
    start) has nothing to add. False where there is none yet or it does not load (then it is rebuilt)."""
    if not lib.exists():
        return False
    try:
        torch.ops.load_library(str(lib))
        return hasattr(torch.ops.deltarun, "gemv_bf16")
    except (OSError, RuntimeError):
        return False


def wait_for_build_lock(lock: Path) -> None:
    """torch's build lock is held while another process builds (wait for it to go) or was left by a build that
    was killed (remove it once older than STALE_LOCK_S). torch itself would wait on a left lock forever."""
    told = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            return
        if not told:
            print(f"deltarun: waiting for another build of the CPU kernels ({lock}; a lock left by a killed build "
                  f"is removed once {STALE_LOCK_S} s old) …", file=sys.stderr, flush=True)
            told = True
        time.sleep(0.5)


def _not_built() -> str | None:
    """"off" (`DELTARUN_CPU_KERNELS=0`) or "no compiler" where the kernels are not to be built, else None."""
    if not settings().cpu_kernels:
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
    _state["attn"] = _attn_check(g)
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


def _attn_check(g: torch.Generator) -> bool:
    """The bf16 prefill attention against an explicit fp32 softmax: GQA, a chunk deep into its keys, every tile
    remainder (rows of a micro-tile, a partial key block, a head size not a multiple of 48)."""
    if not torch.ops.deltarun.attn_bf16_available():
        return False
    q, k, v = (torch.randn(1, h, n, 32, generator=g).bfloat16() for h, n in ((4, 13), (2, 300), (2, 300)))
    scores = (q.float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2) / 8).masked_fill(
        ~torch.ones(13, 300, dtype=torch.bool).tril(287), float("-inf"))
    ref = scores.softmax(-1) @ v.float().repeat_interleave(2, 1)
    if not torch.allclose(torch.ops.deltarun.attn_bf16(q, k, v, 0.125).float(), ref, atol=2e-2):
        log.warning("CPU bf16 attention kernel disagrees with softmax attention: not used")
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
    ours = int4_reorder(packed, torch.ops.deltarun.int4_order())
    sz = (torch.rand(2, 128, 2, generator=g) / 10).bfloat16()  # group 32
    x = torch.randn(3, 64, generator=g).bfloat16()
    ref4 = torch.ops.aten._weight_int4pack_mm_for_cpu(x.float(), packed, 32, sz.float())
    # fp32 activations: exact products; bf16 ones may enter as int8 per group (AVX2, AVX-512 VNNI without BF16):
    # within 3% of the scale
    if not (torch.allclose(torch.ops.deltarun.gemv_int4(x.float(), ours, 32, sz), ref4, rtol=1e-3, atol=1e-3)
            and torch.allclose(torch.ops.deltarun.gemv_int4(x, ours, 32, sz), ref4, rtol=0,
                               atol=0.03 * ref4.abs().max().item())):
        log.warning("CPU int4 decode kernel disagrees with torch's int4 kernel: not used")
        return False
    return True




def int4_order() -> int:
    """The byte order within int4 row blocks that this build's kernels read: 0 torch's, 1 the AVX2 column pairs,
    2 the AVX-512 VNNI quads (ops/int4_layout.py `int4_reorder`); 0 where no kernels run."""
    return int(torch.ops.deltarun.int4_order()) if available() else 0


def has_int4() -> bool:
    """Whether the int4 decode kernel reads torch's int4 layout here (and agreed with torch's kernel)."""
    return available() and bool(_state.get("int4"))


def has_bf16w() -> bool:
    """Whether the bf16-weight prefill GEMM is built here (and agreed with F.linear)."""
    return available() and bool(_state.get("bf16w"))


def has_attn() -> bool:
    """Whether the bf16 prefill attention kernel runs here: built (AVX512-BF16), agreed with softmax attention, and
    the CPU has no AMX, where torch's flash attention multiplies on oneDNN's AMX kernels (`cpublas::could_pack`)
    instead of the SGEMM it falls back to elsewhere (AMX: routed, not measured; `DELTARUN_CPU_LEVEL` keeps ours)."""
    if "amx" not in _state:
        _state["amx"] = _level_or_none() is None and "amx_bf16" in (_cpu_flags() or set())
    return available() and bool(_state.get("attn")) and not _state["amx"]


def has_qgemm_int4() -> bool:
    """Whether the integer int4 prefill matmul is built here (AVX2 without AVX-512: the 32-row pairs layout;
    AVX-512 VNNI without BF16: the 64-row quads layout)."""
    return available() and bool(torch.ops.deltarun.qgemm_int4_available())


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86: AVX512-BF16 or AMX; Arm: BF16). Without
    it torch's bf16 GEMM is emulated: 18 GFLOP/s against 103 for the same product widened to fp32 first
    (2-core AVX2 EPYC, [512, 1024]·[1024, 3584]), so prefill-sized matmuls widen (ops/linear.py)."""
    if "native_bf16" not in _state:
        level = _level_or_none()
        flags = _cpu_flags()
        _state["native_bf16"] = (LEVELS[level][2] if level else
                                 flags is None or bool({"avx512_bf16", "amx_bf16", "bf16"} & flags))
    return bool(_state["native_bf16"])
