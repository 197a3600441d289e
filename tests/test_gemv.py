"""The CPU decode kernels (ops/csrc/gemv.cpp) against their plain torch reference, F.linear."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltarun.ops import gemv, kernels, linear, routes
from deltarun.ops.quant import QuantLinear, dequantize_int8
from deltarun.ops.settings import reload as reload_settings
from deltarun.weights.loader import load_model

pytestmark = pytest.mark.usefixtures("cpu_kernels")


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("n,k", [(1, 64), (7, 64), (257, 128), (1000, 1024), (64, 96), (33, 40), (40, 3584)])
def test_bf16_kernel_matches_fp32_reference(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    want = F.linear(x.float(), w.float())  # the exact products of the bf16 values, summed in fp32
    torch.testing.assert_close(gemv.gemv_bf16(x, w), want, rtol=1e-4, atol=1e-4 * k ** 0.5)


@pytest.mark.parametrize("k", [1024, 3584])  # 3–4 rows: one weight row at a time at 1024, tiles at 3584
def test_bf16_output_cast_and_row_independence(k):
    """The kernel's bf16 output is its fp32 result rounded to nearest even (as Tensor.to), and a row's
    result does not depend on how many rows share the call (MTP's verify reproduces plain decode)."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(16, k, generator=g).bfloat16(), torch.randn(300, k, generator=g).bfloat16()
    full = torch.ops.deltarun.gemv_bf16(x, w, False)
    assert torch.equal(torch.ops.deltarun.gemv_bf16(x, w, True), full.bfloat16())
    for m in range(1, 16):
        assert torch.equal(torch.ops.deltarun.gemv_bf16(x[:m], w, False), full[:m])


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_fp32_projection_matches_linear(m, dtype):
    """DeltaNet's tiny fp32 projections (in_proj_a/b) at decode: a plain loop instead of F.linear."""
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 1024, generator=g).to(dtype), torch.randn(16, 1027, generator=g)[:, :1024].contiguous()
    got = torch.ops.deltarun.gemv_f32(x, w)
    torch.testing.assert_close(got, F.linear(x.float(), w), rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.ops.deltarun.gemv_f32(x[:1], w), got[:1])  # a row is the same alone


@pytest.mark.parametrize("m", [1, 4, 9])
@pytest.mark.parametrize("n,k", [(5, 32), (300, 1024), (17, 48)])
def test_int8_kernel_matches_dequantized_reference(m, n, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, generator=g) / 100).bfloat16()
    want = F.linear(x.float(), dequantize_int8(q, s))
    # activations enter the int8 dot products as 13-bit integers (per-row scale): error ≤ 1e-3 of the
    # output's scale, an order of magnitude below the bf16 rounding of the result
    torch.testing.assert_close(gemv.gemv_int8(x, q, s), want, rtol=0, atol=1e-3 * want.abs().max().item())
    mod = QuantLinear.from_float(dequantize_int8(q, s), 8, dtype=torch.bfloat16)
    mod.pack()
    own = F.linear(x.float(), mod.dequantize())  # the module's path (kernel or torch's beyond 4 rows), bf16 out
    torch.testing.assert_close(mod(x).float(), own, rtol=1e-2, atol=1e-2 * own.abs().max().item())


def test_bad_shapes_are_errors():
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and w \\[N, K\\]"):
        gemv.gemv_bf16(torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(4, 9, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        gemv.gemv_bf16(torch.zeros(17, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16))


def test_decode_linear_routes_few_rows_and_keeps_parameters():
    lin = linear.Linear(128, 96, bias=True).bfloat16()
    ref = nn.Linear(128, 96, bias=True).bfloat16()
    ref.load_state_dict(lin.state_dict())
    assert routes.assign(lin) == 1 and lin.routes["decode"] == "gemv_bf16"
    assert list(lin.state_dict()) == ["weight", "bias"]
    with torch.inference_mode():
        for rows in (1, 4, 40):  # 40 rows: F.linear itself
            x = torch.randn(2, rows, 128).bfloat16()
            torch.testing.assert_close(lin(x).float(), ref(x).float(), rtol=2e-2, atol=2e-2)


def test_bf16_model_decodes_the_same_with_and_without_kernels(tiny_ckpt):
    """Greedy decode of a bf16 model: the kernel path agrees with F.linear everywhere (logits close,
    same tokens)."""
    fast = load_model(tiny_ckpt, dtype="bfloat16", device="cpu")
    plain = load_model(tiny_ckpt, dtype="bfloat16", device="cpu")
    assert any(isinstance(m, linear.Linear) and m.routes and m.routes["decode"] == "gemv_bf16" for m in fast.modules())
    for m in plain.modules():
        if isinstance(m, linear.Linear):
            m.routes = None  # F.linear
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = []
        for model in (fast, plain):
            cache = model.new_cache(2)
            logits = [model.logits(model(ids, cache)[:, -1])]
            tok = logits[-1].argmax(-1, keepdim=True)
            for _ in range(8):  # decode steps: 2 rows through the kernel
                logits.append(model.logits(model(tok, cache)[:, -1]))
                tok = logits[-1].argmax(-1, keepdim=True)
            out.append(torch.stack(logits))
    torch.testing.assert_close(out[0], out[1], rtol=0.05, atol=0.05)
    assert torch.equal(out[0].argmax(-1), out[1].argmax(-1))


def test_switched_off_by_environment(tmp_path):
    code = "from deltarun.ops import kernels; print(kernels.available())"
    env = {"DELTARUN_CPU_KERNELS": "0", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           **{k: os.environ[k] for k in ("PYTHONPATH", "DELTARUN_NETGUARD_LOG")}}  # the network guard
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_failed_build_is_reported_not_mistaken_for_no_compiler(tmp_path):
    """With a compiler that fails, the kernels are off (torch's ops run) and `unavailable_reason` names the
    build error, which the kernel tests turn into a failure (cpu_kernels.py), never a skip."""
    import os

    cxx = tmp_path / "broken-c++"
    cxx.write_text("#!/bin/sh\necho 'broken-c++: internal compiler error' >&2\nexit 1\n")
    cxx.chmod(0o755)
    code = ("from deltarun.ops import kernels\nprint(kernels.available())\nprint(kernels.unavailable_reason())\n"
            "import pytest, cpu_kernels\n"
            "try:\n    cpu_kernels.require_cpu_kernels()\nexcept pytest.fail.Exception as e:\n    print('FAILED', e)\n")
    env = {**os.environ, "DELTARUN_KERNELS_DIR": str(tmp_path / "k"), "CXX": str(cxx)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)
    lines = out.stdout.splitlines()
    assert lines[0] == "False", out.stderr[-2000:]
    assert lines[1] not in ("None", "no compiler", "off")
    assert any(ln.startswith("FAILED the CPU kernels failed to build") for ln in lines), out.stdout


def test_a_killed_build_does_not_block_the_next_load(tmp_path):
    """torch's build lock left behind by an interrupted first build (Ctrl-C while a model loads) is
    cleared once stale, instead of waiting on it forever."""
    import os
    import shutil
    import time

    src = Path(os.environ["DELTARUN_KERNELS_DIR"]) / kernels._cpu_tag()
    dst = tmp_path / kernels._cpu_tag()
    shutil.copytree(src, dst)
    lock = dst / "lock"
    lock.touch()
    old = time.time() - kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    code = "from deltarun.ops import kernels; print(kernels.available())"
    env = {**os.environ, "DELTARUN_KERNELS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True" and not lock.exists()


@pytest.mark.parametrize("m", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("n,k,group", [(64, 64, 32), (192, 256, 64), (128, 512, 128)])
def test_int4_kernel_matches_torch_int4_and_dequantized(m, n, k, group):
    """Same packed weights (torch's CPU int4 layout, row blocks in the build's byte order: AVX2's column pairs,
    AVX-512 VNNI's quads): kernel ==
    dequantized fp32 reference; and the QuantLinear that routes decode rows through it stays within bf16
    output rounding."""
    g = torch.Generator().manual_seed(m + n + k)
    w = torch.randn(n, k, generator=g) / 10
    mod = QuantLinear.from_float(w, 4, group, dtype=torch.bfloat16)
    mod.pack()
    assert mod._cpu4 is not None
    packed, sz, order = mod._cpu4
    assert order == torch.ops.deltarun.int4_order() and (order == 1) == (torch.ops.deltarun.int4_layout_rows() == 32)
    x = torch.randn(m, k, generator=g).bfloat16()
    want = F.linear(x.float(), mod.dequantize())
    # on AVX2 and AVX-512 VNNI without BF16 bf16 activations enter as int8 per group (x̃ = xs·round(x/xs),
    # xs = max|x|/127), as llama.cpp quantizes them: the products are then exact for x̃; with AVX-512 BF16 (or
    # AVX-512 without VNNI) they are exact for x itself
    xg = x.float().view(m, -1, group)
    xs = (xg.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)
    int8_acts = order != 0
    x_t = ((xg / xs).round().clamp(-127, 127) * xs).view(m, k) if int8_acts else x.float()
    want_t = F.linear(x_t, mod.dequantize())
    torch.testing.assert_close(torch.ops.deltarun.gemv_int4(x, packed, group, sz), want_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.ops.deltarun.gemv_int4(x.float(), packed, group, sz), want,
                               rtol=1e-4, atol=1e-4)  # fp32 activations: the widening path, exact
    assert (want_t - want).abs().max() <= 0.02 * want.abs().max()  # what int8 activations cost here
    torch.testing.assert_close(mod(x).float(), want_t, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_int4_cpu_layout_is_read_right():
    """Our reading of torch's CPU int4 layout (its row-block size follows torch's CPU capability)."""
    from deltarun.ops.int4_layout import cpu_int4_block, cpu_layout

    q = torch.randint(0, 16, (192, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    assert cpu_int4_block() in (32, 64)
    got = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(got.flatten(), cpu_layout(q, cpu_int4_block()).flatten())
    assert torch.ops.deltarun.int4_layout_rows() == cpu_int4_block()  # the kernel is built for this machine's layout


def test_linear_via_fp32_is_a_bf16_linear_computed_in_fp32(monkeypatch):
    """Prefill matmuls on CPUs without hardware bf16: the same products, fp32 sums, one rounding; the
    weight widened a row block at a time (also across a block boundary)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 20, 64, generator=g).bfloat16()
    w, b = torch.randn(300, 64, generator=g).bfloat16(), torch.randn(300, generator=g).bfloat16()
    want = F.linear(x.float(), w.float(), b.float()).bfloat16()
    assert torch.equal(linear.linear_via_fp32(x, w, b), want)
    monkeypatch.setattr(linear, "WIDEN_ROWS", 128)
    assert torch.equal(linear.linear_via_fp32(x, w, b), want)
    mod = linear.Linear(64, 300).bfloat16()
    mod.weight.data, mod.bias.data = w, b
    monkeypatch.setitem(kernels._state, "native_bf16", False)
    monkeypatch.setenv("DELTARUN_PREFILL_GEMM", "0")  # not csrc/fgemm.cpp's GEMM (tests/test_fgemm.py)
    reload_settings()
    routes.assign(mod)
    assert mod.routes == {"decode": "gemv_bf16", "prefill": "fp32_widened"}
    with torch.no_grad():
        assert torch.equal(mod(x), want)  # 40 rows: the widened path
        torch.testing.assert_close(mod(x[:1, :2]).float(), want[:1, :2].float(), rtol=1e-2, atol=1e-2)  # decode


def test_native_bf16_matmul_follows_the_cpu_flags():
    flags = next((ln for ln in open("/proc/cpuinfo").read().splitlines() if ln.startswith(("flags", "Features"))), "")
    native = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))
    level = kernels.cpu_level()
    assert kernels.native_bf16_matmul() == (native if level is None else level == "avx512_bf16")


def test_cpu_level_is_checked(monkeypatch):
    """DELTARUN_CPU_LEVEL builds for a lower level than the CPU's (the other classes' kernels, run here);
    an unknown level, or one this CPU cannot run, is a clear error, never a silent native build."""
    flags = kernels._cpu_flags() or set()
    monkeypatch.setenv("DELTARUN_CPU_LEVEL", "avx9")
    reload_settings()
    with pytest.raises(ValueError, match="expected one of native, avx2, avx512_core, avx512, avx512_bf16"):
        kernels.cpu_level()
    for level, (march, needs, _) in kernels.LEVELS.items():
        monkeypatch.setenv("DELTARUN_CPU_LEVEL", level)
        reload_settings()
        if needs <= flags:
            assert kernels.cpu_level() == level and kernels._march() == march
        else:
            with pytest.raises(ValueError, match="this CPU lacks"):
                kernels.cpu_level()
    monkeypatch.setenv("DELTARUN_CPU_LEVEL", "native")
    reload_settings()
    assert kernels.cpu_level() is None and kernels._march() == ["-march=native"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wdtype", ["same", "fp32"])
def test_fused_norms_match_torch(dtype, wdtype):
    """csrc/norm.cpp's zero-centred RMSNorm, alone and after the residual add, against F.rms_norm in fp32."""
    g = torch.Generator().manual_seed(7)
    x, h = (torch.randn(3, 5, 64, generator=g).to(dtype) for _ in range(2))
    w = (torch.randn(64, generator=g) / 10).to(dtype if wdtype == "same" else torch.float32)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)  # ≤ 1 bf16 ulp

    def ref(v):
        return F.rms_norm(v.float(), (64,), 1.0 + w.float(), 1e-6).to(dtype)
    torch.testing.assert_close(torch.ops.deltarun.rms_norm_zc(x, w, 1e-6), ref(x), **tol)
    xt = x.transpose(0, 1)  # not contiguous
    torch.testing.assert_close(torch.ops.deltarun.rms_norm_zc(xt, w, 1e-6), ref(xt), **tol)
    s, y = torch.ops.deltarun.add_rms_norm_zc(x, h, w, 1e-6)
    assert torch.equal(s, x + h)  # the residual sum rounds as torch's add does
    torch.testing.assert_close(y, ref(x + h), **tol)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.deltarun.rms_norm_zc(x, w[:10], 1e-6)


def test_kernel_sources_compile_for_the_other_cpu_family():
    """The instruction-set branches this host does not build are type-checked too (an AVX-512-only
    mistake must not surface first on a user's AVX-512 machine, nor an AVX2 one on a laptop): AVX-512
    hosts check the AVX2 build, others the AVX-512 (BF16, VNNI, VBMI) one; and every host checks the
    sources with AVX-512-without-BF16 branches (the common cloud Xeon) for that level, and those with
    AVX-512-without-VNNI branches (Skylake-SP) for that one."""
    import platform
    import shutil
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs an x86 C++ compiler")
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    march = "haswell" if "avx512f" in open("/proc/cpuinfo").read() else "sapphirerapids"
    jobs = [(name, march) for name in kernels.SOURCES]
    jobs += [(name, "cascadelake") for name in kernels.SOURCES
             if "AVX512BF16" in (text := kernels.SOURCE.with_name(name).read_text()) or "gemv_kernels.h" in text]
    # AVX-512 without VNNI (Skylake-SP, DELTARUN_CPU_LEVEL=avx512_core): the sources that branch on VNNI
    jobs += [(name, "skylake-avx512") for name in kernels.SOURCES
             if "VNNI" in kernels.SOURCE.with_name(name).read_text()]

    def check(job: tuple[str, str]) -> subprocess.CompletedProcess:
        name, arch = job
        return subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-march={arch}", "-fopenmp", *flags,
                               str(kernels.SOURCE.with_name(name))], capture_output=True, text=True)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # each parse of torch's headers: ~10 s
        for (name, arch), out in zip(jobs, pool.map(check, jobs)):
            assert out.returncode == 0, f"{name} with -march={arch}:\n{out.stderr[-2000:]}"


@pytest.mark.parametrize("onednn", [True, False])
def test_fp32_prefill_linear_matches_f_linear(monkeypatch, onednn):
    """The widened bf16 prefill product goes through oneDNN's fp32 GEMM where torch has it, else F.linear:
    either way F.linear's result up to fp32 summation order (3-D activations, bias)."""
    monkeypatch.setitem(linear._onednn, "ok", onednn and torch.backends.mkldnn.is_available())
    g = torch.Generator().manual_seed(9)
    x, w, b = torch.randn(2, 37, 96, generator=g), torch.randn(130, 96, generator=g), torch.randn(130, generator=g)
    got = linear._linear_f32(x, w, b)
    assert got.shape == (2, 37, 130)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_a_fresh_build_lock_is_waited_for_then_cleared(tmp_path, monkeypatch):
    """A lock younger than STALE_LOCK_S: another build may hold it (wait until it goes), or a build killed a
    moment ago left it (removed once stale) — never an endless wait."""
    import threading
    import time

    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.6, lock.unlink).start()  # another process finishing its build
    t = time.time()
    kernels.wait_for_build_lock(lock)
    assert 0.5 <= time.time() - t < 5
    monkeypatch.setattr(kernels, "STALE_LOCK_S", 1)
    lock.touch()  # left by a build killed just now
    t = time.time()
    kernels.wait_for_build_lock(lock)
    assert not lock.exists() and 0.9 <= time.time() - t < 5
    kernels.wait_for_build_lock(lock)  # no lock: returns at once


def test_linear_adds_an_adapter_delta_on_any_route():
    """Linear.delta (the LoRA hook) is added to whichever route the layer takes; None leaves it untouched."""
    lin = linear.Linear(64, 32, bias=False).bfloat16()
    routes.assign(lin)
    x = torch.randn(3, 64).bfloat16()
    with torch.inference_mode():
        base = lin(x)
        lin.delta = lambda t: torch.ones(*t.shape[:-1], 32, dtype=t.dtype)
        assert torch.equal(lin(x), base + 1)
        lin.routes = None  # F.linear: the same delta on top
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight) + 1)
