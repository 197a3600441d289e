"""The bf16-weight prefill GEMM (ops/csrc/fgemm.cpp) against F.linear in fp32 and fp64: every remainder of
its tiling (6-row × 16-column tiles on AVX2, 8 × 32 on AVX-512, 64-column blocks, 256-column K blocks), the bf16
rounding of its output, and the route from DecodeLinear on CPUs without hardware bf16 matmul."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltarun.ops import kernels, linear, routes
from deltarun.ops.settings import reload as reload_settings

pytestmark = pytest.mark.usefixtures("cpu_kernels", "gemm_built")


@pytest.fixture(scope="module")
def gemm_built(cpu_kernels):
    if not torch.ops.deltarun.gemm_bf16w_available():
        pytest.skip("this CPU has no AVX2+FMA: the bf16-weight GEMM is not built (oneDNN's fp32 GEMM runs)")


def _data(m: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()


@pytest.mark.parametrize("m", [1, 5, 6, 7, 8, 9, 13, 17, 50, 97])
@pytest.mark.parametrize("k,n", [(8, 16), (37, 3), (256, 64), (300, 70), (64, 33), (520, 129), (1024, 200)])
def test_matches_fp64_reference(m, k, n):
    x, w = _data(m, k, n)
    ref = x.double() @ w.double().T
    got = torch.ops.deltarun.gemm_bf16w(x, w)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # fp32 sums of exact products (bf16 × bf16 fits fp32): within fp32 rounding of the sum's magnitude
    bound = 1e-6 * k * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((got.double() - ref).abs() <= bound).all()
    torch.testing.assert_close(got, F.linear(x.float(), w.float()), rtol=1e-5, atol=1e-4)


def test_fp32_activations_and_rows_split_across_threads():
    """fp32 x is taken as it is (not rounded to bf16); a narrow weight splits the rows between threads."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(500, 96, generator=g), torch.randn(16, 96, generator=g).bfloat16()
    torch.testing.assert_close(torch.ops.deltarun.gemm_bf16w(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-4)


def test_bf16_output_is_rounded_once_to_nearest_even():
    """cast=True rounds the fp32 accumulators straight to bf16: the same as torch's conversion of the fp32
    result (ties to even, NaN kept NaN, inf kept inf)."""
    x, w = _data(29, 300, 150, seed=2)
    x[3, 0], x[4, 0], w[5, 0] = float("nan"), float("inf"), 0.0
    full = torch.ops.deltarun.gemm_bf16w(x, w)
    got = torch.ops.deltarun.gemm_bf16w(x, w, True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), full.isnan()) and got[3].isnan().all()
    ok = ~full.isnan()
    assert torch.equal(got[ok], full[ok].bfloat16())
    # sums that fall halfway between two bf16 values (ties to even, both ways), a huge one, a subnormal one
    parts = torch.tensor([[1.0, 2 ** -8], [1.0, 3 * 2 ** -8], [-1.0, -(2 ** -8)], [3e38, 2e35], [1e-40, 0.0]])
    got = torch.ops.deltarun.gemm_bf16w(torch.ones(1, 2).bfloat16(), parts.bfloat16(), True)
    assert torch.equal(got.flatten(), parts.bfloat16().float().sum(1).bfloat16())
    assert got.flatten()[:2].tolist() == [1.0, 1.0 + 2 ** -6]


def test_decode_linear_routes_prefill_rows_through_it(monkeypatch):
    """DecodeLinear's many-row bf16 calls on a CPU without hardware bf16: this GEMM (bias added in fp32 before
    the one rounding), or the widened oneDNN/F.linear path with DELTARUN_PREFILL_GEMM=0 — within one bf16
    rounding of each other and of F.linear in fp32."""
    x, w = _data(40, 64, 300, seed=3)
    b = torch.randn(300, generator=torch.Generator().manual_seed(4)).bfloat16()
    want = F.linear(x.float(), w.float(), b.float())
    mod = linear.Linear(64, 300).bfloat16()
    mod.weight.data, mod.bias.data = w, b
    monkeypatch.setitem(kernels._state, "native_bf16", False)
    routes.assign(mod)
    assert mod.routes["prefill"] == "gemm_bf16w"
    calls = []
    real = torch.ops.deltarun.gemm_bf16w
    monkeypatch.setattr(linear, "linear_via_fp32",
                        lambda *a: calls.append("fp32") or F.linear(*(t.float() for t in a)).bfloat16())
    with torch.no_grad():
        got = mod(x.view(2, 20, 64))
        assert calls == [] and got.shape == (2, 20, 300)
        torch.testing.assert_close(got.view(40, 300).float(), want, rtol=8e-3, atol=1e-3)
        assert torch.equal(linear.linear_bf16w(x, w), real(x, w, True))
        monkeypatch.setenv("DELTARUN_PREFILL_GEMM", "0")
        reload_settings()
        routes.assign(mod)  # routes are chosen at load: a switch changed later takes effect on the next load
        assert mod.routes["prefill"] == "fp32_widened"
        mod(x)
        assert calls == ["fp32"]


def test_bad_arguments_are_errors():
    x, w = _data(4, 32, 8)
    with pytest.raises(RuntimeError, match="bf16 weights"):
        torch.ops.deltarun.gemm_bf16w(x, w.float())
    with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
        torch.ops.deltarun.gemm_bf16w(x[:, :16], w)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.deltarun.gemm_bf16w(x, w.T.contiguous().T)
    assert torch.ops.deltarun.gemm_bf16w(x[:0], w).shape == (0, 8)
    assert torch.equal(torch.ops.deltarun.gemm_bf16w(x[:, :0], w[:, :0]), torch.zeros(4, 8))
