"""csrc/lora.cpp `lora_expand` (a LoRA delta's expand for a decode step's rows) against its torch reference,
(t ⊙ mask) · bt in fp64; its bf16 output is the fp32 result rounded as Tensor.to; rows and masked slots."""
from __future__ import annotations

import pytest
import torch

from deltarun.ops import gemv

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _case(m: int, k: int, n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(m, k, generator=g)
    rank = max(1, k // 4)  # rows on different slots (some on none), as the engine's masks are
    slot = torch.randint(-1, k // rank, (m,), generator=g)
    mask = (slot[:, None] == torch.arange(k)[None, :] // rank).float()
    bt = torch.randn(k, n, generator=g).to(dtype)
    return t, mask, bt


@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("k,n", [(64, 1024), (16, 6144), (8, 16), (48, 257), (64, 5000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_expand_matches_reference(m, k, n, dtype):
    t, mask, bt = _case(m, k, n, dtype, seed=m * 100 + k + n)
    got = gemv.lora_expand(t, mask, bt)
    want = ((t * mask).double() @ bt.double())
    assert got.dtype == dtype and got.shape == (m, n)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * k ** 0.5)
    else:  # fp32 sums rounded once to bf16: within one bf16 step of the exact value
        assert ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-5).all()
    unused = mask.sum(1) == 0  # rows with no adapter get exact zeros
    assert (got[unused] == 0).all()


def test_lora_expand_bf16_rounding_and_row_independence():
    t, mask, bt = _case(16, 64, 3000, torch.bfloat16, seed=5)
    full = gemv.lora_expand(t, mask, bt.float())  # the same sums in fp32
    got = gemv.lora_expand(t, mask, bt)
    assert torch.equal(got, full.bfloat16())
    for m in (1, 5, 9):  # a row's result does not depend on the rows beside it
        assert torch.equal(gemv.lora_expand(t[:m], mask[:m], bt), got[:m])


def test_lora_expand_refuses_bad_shapes():
    t, mask, bt = _case(4, 16, 32, torch.bfloat16, seed=1)
    with pytest.raises(RuntimeError, match="t \\[M ≤ 16, K\\] and bt \\[K, N\\]"):
        gemv.lora_expand(t, mask, bt[:8])
    with pytest.raises(RuntimeError, match="mask"):
        gemv.lora_expand(t, mask[:2], bt)
    with pytest.raises(RuntimeError, match="M ≤ 16"):
        gemv.lora_expand(torch.zeros(17, 16), torch.zeros(17, 16), bt)
