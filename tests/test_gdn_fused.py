"""The fused CPU DeltaNet decode step (ops/csrc/gdn.cpp) against its torch reference (ops/gdn.py)."""
import pytest
import torch

from deltarun.ops import gdn

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _problem(dtype, hk, hv, dk, dv, slots_n=5, batch=3, kernel=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = 2 * hk * dk + hv * dv
    return dict(
        conv_pool=torch.randn(slots_n, c, kernel - 1, generator=g).to(dtype),
        conv_w=(torch.randn(c, kernel, generator=g) / 2).to(dtype),
        A_log=torch.randn(hv, generator=g) / 2, dt_bias=torch.randn(hv, generator=g),
        rec_pool=torch.randn(slots_n, hv, dk, dv, generator=g) / 4,
        norm_w=(1 + torch.randn(dv, generator=g) / 10).to(dtype),
    ), c


def _inputs(dtype, batch, c, hv, dv, step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(batch, c, generator=g).to(dtype), torch.randn(batch, hv, generator=g) * 2,
            torch.randn(batch, hv, generator=g) * 2, torch.randn(batch, hv * dv, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hk,hv,dk,dv,kernel", [(2, 4, 16, 24, 4), (2, 2, 32, 32, 4), (1, 3, 128, 128, 4),
                                                (2, 2, 16, 64, 3), (1, 2, 16, 32, 2)])
@pytest.mark.parametrize("slots", ["index", "slice"])
def test_fused_decode_step_matches_reference_over_steps(dtype, hk, hv, dk, dv, kernel, slots):
    """Several tokens in a row, states carried in the pools: same outputs and same pools as torch's step. Head
    sizes on and off the vector loops' slices (64 values with AVX-512, 32 with AVX2); Qwen3.5's 4-tap convolution
    and others (the generic loop)."""
    ref, c = _problem(dtype, hk, hv, dk, dv, kernel=kernel)
    fused = {k: v.clone() for k, v in ref.items()}
    sl = torch.tensor([4, 0, 2]) if slots == "index" else slice(1, 4)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for step in range(4):
        mixed, a, b, z = _inputs(dtype, 3, c, hv, dv, step)
        args = (hk, z)
        snap_ref, snap = torch.full((2, 3, hv, dk, dv), float("nan")), torch.full((2, 3, hv, dk, dv), float("nan"))
        want = gdn.decode_step_reference(mixed, ref["conv_pool"], ref["conv_w"], a, b, ref["A_log"], ref["dt_bias"],
                                         ref["rec_pool"], sl, *args, ref["norm_w"], 1e-6, snap=snap_ref[step % 2])
        got = gdn.decode_step(mixed, fused["conv_pool"], fused["conv_w"], a, b, fused["A_log"], fused["dt_bias"],
                              fused["rec_pool"], sl, *args, fused["norm_w"], 1e-6, snap=snap[step % 2])
        # the snapshot (speculative verify's record of the state after this position) is the pool's new rows
        torch.testing.assert_close(snap[step % 2], fused["rec_pool"][sl], rtol=0, atol=0)
        torch.testing.assert_close(snap_ref[step % 2], ref["rec_pool"][sl], rtol=0, atol=0)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), **tol)
        torch.testing.assert_close(fused["conv_pool"], ref["conv_pool"], rtol=0, atol=0)  # a shift: exact
        torch.testing.assert_close(fused["rec_pool"], ref["rec_pool"], rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_errors():
    ref, c = _problem(torch.float32, 2, 4, 16, 24)
    mixed, a, b, z = _inputs(torch.float32, 3, c, 4, 24, 0)
    with pytest.raises(RuntimeError, match="shapes"):
        torch.ops.deltarun.gdn_decode_(mixed[:, :-1].contiguous(), ref["conv_pool"], ref["conv_w"], a, b,
                                       ref["A_log"], ref["dt_bias"], ref["rec_pool"], torch.tensor([0, 1, 2]), 2, z,
                                       ref["norm_w"], 1e-6)
