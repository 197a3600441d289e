"""The bf16 prefill attention kernel (ops/csrc/attn.cpp) against an explicit fp64 softmax: GQA and plain heads, a
whole prompt and chunks deep into their keys, every remainder of its tiling (8-row micro-tiles, 64-query tasks,
16/32-key packing, 256-key blocks, 48-wide vectors), strided inputs as the model and the cache make them, and the
dispatch from ops/attention.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltarun.ops.attention as att
from deltarun.ops import kernels

pytestmark = pytest.mark.usefixtures("cpu_kernels", "attn_built")


@pytest.fixture(scope="module")
def attn_built(cpu_kernels):
    if not torch.ops.deltarun.attn_bf16_available():
        pytest.skip("this CPU has no AVX512-BF16: bf16 prompt attention stays on torch's flash attention")


def reference(q, k, v, scale, causal=True):
    """Softmax attention in fp64; causal: the T queries are the last T of the S positions."""
    hq, t, s = q.shape[1], q.shape[2], k.shape[2]
    k = k.double().repeat_interleave(hq // k.shape[1], dim=1)
    v = v.double().repeat_interleave(hq // v.shape[1], dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t) if causal else torch.ones(t, s, dtype=torch.bool)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def torch_sdpa(q, k, v, scale):
    """torch's own bf16 attention of the same inputs (its flash kernel), the error to match."""
    g = q.shape[1] // k.shape[1]
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(diagonal=k.shape[2] - q.shape[2])
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask,
                                          scale=scale)


def _inputs(b, hq, hkv, t, s, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g).bfloat16().transpose(1, 2)  # [B, Hq, T, D] strided, as the model's
    cache = torch.randn(2, b, hkv, s + 5, d, generator=g).bfloat16()  # a cache longer than its filled part
    return q, cache[0, :, :, :s], cache[1, :, :, :s]


@pytest.mark.parametrize("b,hq,hkv,t,s,d", [
    (1, 2, 1, 1, 1, 16),        # one query, one key
    (1, 2, 2, 5, 5, 16),        # a prompt shorter than a micro-tile
    (1, 4, 2, 37, 100, 32),     # GQA, a chunk after a cache, partial tiles everywhere
    (2, 8, 2, 130, 300, 64),    # a batch; tasks of 64 queries plus a remainder; a second key block
    (1, 2, 2, 300, 300, 48),    # a whole prompt over two key blocks; head size of one 48-wide vector
    (1, 8, 2, 64, 1000, 256),   # the real head size (16 vectors: 5 tiles of 3 and one of 1), four key blocks
    (1, 2, 1, 9, 513, 80),      # keys one past a block boundary; head size 80 (tiles of 3 and 2)
])
def test_matches_fp64_softmax_as_closely_as_torch(b, hq, hkv, t, s, d):
    q, k, v = _inputs(b, hq, hkv, t, s, d, seed=t + s)
    scale = d ** -0.5
    want = reference(q, k, v, scale)
    got = torch.ops.deltarun.attn_bf16(q, k, v, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (b, hq, t, d) and got.is_contiguous()
    ours = (got.double() - want).abs().max().item()
    theirs = (torch_sdpa(q, k, v, scale).double() - want).abs().max().item()
    # the same bf16 products and fp32 sums, p rounded to bf16 as torch rounds it, the output rounded once
    assert ours <= 1.5 * theirs + 2 ** -9 * want.abs().max().item(), (ours, theirs)


@pytest.mark.parametrize("b,h,t,s,d", [
    (3, 12, 300, 300, 64),   # vision frames: 12 heads of 64, batched frames, a partial key block
    (1, 2, 5, 700, 32),      # fewer queries than keys
    (1, 2, 90, 20, 16),      # more queries than keys (only without the causal mask)
])
def test_bidirectional_matches_fp64_softmax(b, h, t, s, d):
    q, k, v = _inputs(b, h, h, t, s, d, seed=t * 7 + s)
    want = reference(q, k, v, d ** -0.5, causal=False)
    got = torch.ops.deltarun.attn_bf16(q, k, v, d ** -0.5, False)
    g = q.shape[1] // k.shape[1]
    theirs = (F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)).double()
              - want).abs().max().item()
    assert (got.double() - want).abs().max().item() <= 1.5 * theirs + 2 ** -9 * want.abs().max().item()


def test_full_attention_takes_the_kernel_for_bf16_frames(monkeypatch, no_amx):
    calls = []
    real = torch.ops.deltarun.attn_bf16

    class Ops:
        @staticmethod
        def attn_bf16(*a):
            calls.append(a[4])
            return real(*a)

    monkeypatch.setattr(att.torch.ops, "deltarun", Ops)
    q, k, v = _inputs(2, 4, 4, 40, 40, 32, seed=9)
    torch.testing.assert_close(att.full_attention(q, k, v).double(), reference(q, k, v, 32 ** -0.5, causal=False),
                               atol=2e-2, rtol=0)
    assert calls == [False]
    att.full_attention(q.float(), k.float(), v.float())  # fp32 (the parity tests' towers): torch
    att.full_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4])  # tiny frames: torch
    assert calls == [False]


def test_cpus_with_amx_keep_torchs_attention(monkeypatch):
    """With AMX, torch's flash attention runs on oneDNN's AMX kernels: the route leaves the work there."""
    monkeypatch.setitem(kernels._state, "amx", False)
    assert kernels.has_attn()
    monkeypatch.setitem(kernels._state, "amx", True)
    assert not kernels.has_attn()
    monkeypatch.delitem(kernels._state, "amx")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert not kernels.has_attn()
    monkeypatch.delitem(kernels._state, "amx")
    monkeypatch.setattr(kernels, "cpu_level", lambda: "avx512_bf16")  # a chosen level: ours, as on that class
    assert kernels.has_attn()
    monkeypatch.delitem(kernels._state, "amx")


def test_each_query_sees_only_its_own_past():
    """Changing a key/value at position p changes exactly the outputs of queries at p and after."""
    q, k, v = _inputs(1, 2, 1, 70, 90, 32, seed=4)
    base = torch.ops.deltarun.attn_bf16(q, k, v, 0.2)
    p = 50  # the query at index p - (S - T) = 30 is the first to see it
    k2, v2 = k.clone(), v.clone()
    k2[:, :, p] += 3
    v2[:, :, p] -= 5
    moved = (torch.ops.deltarun.attn_bf16(q, k2, v2, 0.2) != base).any(-1).any(1)[0]
    assert not moved[:30].any() and moved[30:].all()


def test_rejects_what_it_cannot_run():
    q, k, v = _inputs(1, 2, 1, 4, 8, 16)
    with pytest.raises(RuntimeError, match="bf16"):
        torch.ops.deltarun.attn_bf16(q.float(), k, v, 0.25)
    with pytest.raises(RuntimeError, match="shapes"):
        torch.ops.deltarun.attn_bf16(q, k[..., :8], v, 0.25)
    with pytest.raises(RuntimeError, match="shapes"):  # more queries than keys
        torch.ops.deltarun.attn_bf16(torch.zeros(1, 2, 9, 16, dtype=torch.bfloat16), k, v, 0.25)


@pytest.fixture
def no_amx(monkeypatch):
    """Route as on a CPU without AMX (where the kernel runs), whatever this one has."""
    monkeypatch.setitem(kernels._state, "amx", False)
    assert kernels.has_attn()


def test_attention_routes_bf16_chunks_to_the_kernel(monkeypatch, no_amx):
    """ops/attention.py sends bf16 chunks of ≥ KERNEL_ROWS queries here (≥ KERNEL_ROWS_SHALLOW over few keys); one
    query, fp32, head sizes that are not a multiple of 16 and tensors that need a gradient go to torch."""
    calls = []
    real = torch.ops.deltarun.attn_bf16

    class Ops:
        @staticmethod
        def attn_bf16(*a):
            calls.append(a[0].shape)
            return real(*a)

    monkeypatch.setattr(att.torch.ops, "deltarun", Ops)
    q, k, v = _inputs(1, 4, 2, att.KERNEL_ROWS, 40, 32)
    want = reference(q, k, v, 0.3)
    torch.testing.assert_close(att.attention(q, k, v, 0.3).double(), want, atol=2e-2, rtol=0)
    assert calls == [q.shape]
    att.attention(q[:, :, :1], k, v, 0.3)  # decode
    att.attention(q.float(), k.float(), v.float(), 0.3)
    att.attention(q[..., :24].contiguous(), k[..., :24].contiguous(), v[..., :24].contiguous(), 0.3)
    att.attention(q[:, :, : att.KERNEL_ROWS_SHALLOW - 1], k, v, 0.3)
    with torch.enable_grad():
        att.attention(q.detach().requires_grad_(), k, v, 0.3)
    assert len(calls) == 1
    att.attention(q[:, :, : att.KERNEL_ROWS_SHALLOW], k, v, 0.3)  # few queries over few keys
    assert len(calls) == 2
    monkeypatch.setattr(att, "SHALLOW_KEYS", 39)
    att.attention(q[:, :, : att.KERNEL_ROWS_SHALLOW], k, v, 0.3)  # … over more keys: torch
    assert len(calls) == 2
