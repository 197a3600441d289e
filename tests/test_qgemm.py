"""The integer prefill matmuls (ops/csrc/qgemm.cpp) against the decode kernels and an independent torch
reference: the activations quantized in torch as documented, times the dequantized weights, in fp64.

The int4 GEMM exists where torch packs int4 in 32-row blocks (AVX2 without AVX-512F). On AVX-512 CPUs
(64-row blocks) prefill dequantizes row blocks for torch's GEMM instead: the same cases check that route."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltarun.ops import kernels
from deltarun.ops.quant import KERNEL_BLOCK_ROWS, PREFILL_ROWS, QuantLinear
from deltarun.ops.settings import reload as reload_settings

pytestmark = pytest.mark.usefixtures("cpu_kernels")
U = 2.0 ** -24  # fp32 unit roundoff
BF16_U = 2.0 ** -9  # bf16 unit roundoff (8 significant bits)


def _q8_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """x [M, K] → x̃ in fp64: per group of g columns, xs = max(max|x| / 127, 1e-30), round(x / xs) half to even."""
    xg = x.float().view(x.shape[0], -1, g)
    xs = (xg.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)
    return (torch.round((xg / xs).clamp(-127, 127)).double() * xs.double()).view_as(x)


def _q16_rows(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    sx = xf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 8191
    return torch.round(xf / sx).double() * sx.double()


def _linear(k: int, n: int, bits: int, group: int = 64, seed: int = 0) -> QuantLinear:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    mod = QuantLinear.from_float(w, bits, group)
    mod.pack()
    return mod


def _dequantized_route_bound(x: torch.Tensor, w: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got − want| for a bf16 output of x [M, K] · w [N, K]ᵀ computed as a bf16 or fp32 GEMM, any summation
    order: the weight may be rounded to bf16 (≤ BF16_U·|w| each), the fp32 sum carries ≤ γ_K = K·U/(1 − K·U)
    of Σ|x||w| (Higham, Accuracy and Stability, eq. 3.5), and the output is rounded to bf16 (≤ BF16_U·|y|)."""
    k = x.shape[-1]
    gamma = k * U / (1 - k * U)
    mag = x.double().abs() @ w.double().abs().T
    return BF16_U * want.abs() * (1 + BF16_U) + (BF16_U + gamma) * mag * (1 + BF16_U) + 1e-30


def _int4_kernel_blocks(mod: QuantLinear, x: torch.Tensor) -> None:
    """Without the int4 GEMM, 16…KERNEL_BLOCK_ROWS rows run the decode kernel 16 rows at a time: each row's output
    is the one it gets alone (a batched decode step equals single-sequence steps)."""
    assert PREFILL_ROWS <= x.shape[0] <= KERNEL_BLOCK_ROWS
    got = mod(x)
    assert torch.equal(got, torch.cat([mod(x[i:i + 1]) for i in range(x.shape[0])]))


def _int4_prefill_fallback(mod: QuantLinear, x: torch.Tensor) -> None:
    """Without the int4 GEMM (AVX-512: torch's 64-row layout), many-row calls dequantize for torch's GEMM."""
    assert mod._gemm is None
    with pytest.raises(RuntimeError, match="qgemm_int4"):
        torch.ops.deltarun.qgemm_int4(x, torch.zeros(mod.out_features * mod.in_features // 2, dtype=torch.uint8),
                                      mod.group_size, torch.zeros(1, mod.out_features, 2, dtype=torch.bfloat16))
    got = mod(x)
    w = mod.dequantize()
    # structurally the same GEMM as the documented route (one row block, n ≤ ROW_BLOCK): bit for bit …
    xm, wt = (x, torch.bfloat16) if kernels.native_bf16_matmul() else (x.float(), torch.float32)
    assert torch.equal(got, F.linear(xm, w.to(wt)).to(x.dtype))
    # … and within the rounding of a bf16 GEMM of the exact product
    want = F.linear(x.double(), w.double())
    assert ((got.double() - want).abs() <= _dequantized_route_bound(x, w, want)).all()


@pytest.mark.parametrize("m", [1, 3, 5, 17, 70])
@pytest.mark.parametrize("k,n,group", [(64, 32, 32), (256, 96, 64), (384, 64, 128), (1024, 160, 64)])
def test_int4_gemm_is_exact_for_the_quantized_activations(m, k, n, group):
    mod = _linear(k, n, 4, group, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)).bfloat16()
    # AVX-512 BF16 (or a weight whose rows are not whole blocks of the layout): from KERNEL_BLOCK_ROWS + 1 rows,
    # calls dequantize
    if not kernels.has_qgemm_int4() or mod._cpu4 is None:
        if mod._kernel is not None and mod._kernel.name == "gemv_int4":
            _int4_kernel_blocks(mod, torch.cat([x] * (PREFILL_ROWS // m + 2))[:max(m, PREFILL_ROWS + 3)])
        rows = KERNEL_BLOCK_ROWS + 1
        return _int4_prefill_fallback(mod, torch.cat([x] * (rows // m + 1))[:max(m, rows)])
    packed, sz, order = mod._cpu4
    assert order in (1, 2)  # AVX2's column pairs, AVX-512 VNNI's quads
    got = torch.ops.deltarun.qgemm_int4(x, packed, group, sz)
    want = F.linear(_q8_groups(x, group), mod.dequantize().double()).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # the decode kernel quantizes the same way: same values up to fp32 summation order
    for i in range(0, m, 16):
        dec = torch.ops.deltarun.gemv_int4(x[i:i + 16], packed, group, sz)
        torch.testing.assert_close(got[i:i + 16], dec, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("m", [1, 4, 6, 33])
@pytest.mark.parametrize("k,n", [(64, 5), (256, 70), (1024, 300)])
def test_int8_gemm_is_the_decode_kernel_bit_for_bit(m, k, n):
    mod = _linear(k, n, 8, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)).bfloat16()
    q, scales = mod._kernel.packed, mod._kernel.args[0]
    got = torch.ops.deltarun.qgemm_int8(x, q, scales)
    dec = torch.cat([torch.ops.deltarun.gemv_int8(x[i:i + 16], q, scales) for i in range(0, m, 16)])
    assert torch.equal(got, dec)
    want = F.linear(_q16_rows(x), q.double() * scales.double()[:, None]).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_rows_take_the_gemm(bits):
    """A QuantLinear's many-row (prefill) calls run the integer GEMM, rounded like the decode path's bf16
    output (int4 on AVX-512: the kernel in blocks of 16 rows up to KERNEL_BLOCK_ROWS, the dequantized route
    beyond); fp32 activations keep the exact dequantized product."""
    mod = _linear(512, 128, bits)
    x = torch.randn(2, PREFILL_ROWS + 3, 512, generator=torch.Generator().manual_seed(5)).bfloat16()
    if bits == 4 and not kernels.has_qgemm_int4():
        _int4_kernel_blocks(mod, x.view(-1, 512))
        return _int4_prefill_fallback(mod, torch.cat([x.view(-1, 512)] * 4))
    assert mod._gemm is not None
    got = mod(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, PREFILL_ROWS + 3, 128)
    xt = _q16_rows(x.view(-1, 512)) if bits == 8 else _q8_groups(x.view(-1, 512), 64)
    want = F.linear(xt, mod.dequantize().double()).view(2, -1, 128)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    mod32 = QuantLinear.from_float(torch.randn(128, 512) * 0.05, bits, 64, dtype=torch.float32)
    mod32.pack()
    x32 = x.float()
    torch.testing.assert_close(mod32(x32), F.linear(x32, mod32.dequantize()), rtol=1e-4, atol=1e-4)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("DELTARUN_PREFILL_GEMM", "0")
    reload_settings()
    assert _linear(256, 64, 8)._gemm is None


def test_bad_arguments_are_errors():
    mod = _linear(64, 32, 8)
    q, scales = mod._kernel.packed, mod._kernel.args[0]
    with pytest.raises(RuntimeError, match="fp32 activations"):
        torch.ops.deltarun.qgemm_int8(torch.randn(20, 64), q, scales)
    with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
        torch.ops.deltarun.qgemm_int8(torch.randn(20, 48).bfloat16(), q, scales)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.deltarun.qgemm_int8(torch.randn(20, 64).bfloat16(), q, scales[:3])
