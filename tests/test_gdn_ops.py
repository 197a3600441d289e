"""The chunked gated-delta-rule (prefill) against the token-by-token recurrence, and conv1d state carry."""
import pytest
import torch
from cpu_kernels import require_cpu_kernels

from deltarun.ops.conv1d import causal_conv1d, causal_conv1d_reference
from deltarun.ops.gdn import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_torch,
    gated_delta_step_,
    recurrent_gated_delta_rule,
)


def _inputs(b, t, hk, hv, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hk, dk, generator=g)
    k = torch.randn(b, t, hk, dk, generator=g)
    v = torch.randn(b, t, hv, dv, generator=g)
    gate = -torch.rand(b, t, hv, generator=g) * 2
    beta = torch.rand(b, t, hv, generator=g)
    state = torch.randn(b, hv, dk, dv, generator=g) * 0.1
    return q, k, v, gate, beta, state


def _chunked(impl):
    """chunk_gated_delta_rule through torch ops, or through the C++ op (ops/csrc/gdn_chunk.cpp: taken without
    autograd on the CPU where the kernels are built, chunks of 64)."""
    if impl == "torch":
        return chunk_gated_delta_rule_torch
    require_cpu_kernels()

    def run(*args, chunk_size=64):  # other chunk sizes: the dispatcher's torch fallback, checked the same way
        with torch.no_grad():
            return chunk_gated_delta_rule(*args, chunk_size=chunk_size)
    return run


@pytest.mark.parametrize("impl", ["torch", "op"])
@pytest.mark.parametrize("t,chunk", [(1, 64), (63, 64), (64, 64), (150, 64), (77, 16)])
@pytest.mark.parametrize("hk,hv,dk,dv", [(2, 4, 16, 24), (3, 3, 8, 8)])
def test_chunked_equals_recurrent(t, chunk, hk, hv, dk, dv, impl):
    q, k, v, g, beta, s0 = _inputs(2, t, hk, hv, dk, dv)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    o, s = _chunked(impl)(q, k, v, g, beta, s0, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-4)
    assert s.dtype == torch.float32


@pytest.mark.parametrize("impl", ["torch", "op"])
def test_split_sequence_carries_state(impl):
    chunked = _chunked(impl)
    q, k, v, g, beta, _ = _inputs(1, 100, 2, 4, 16, 16, seed=1)
    o_full, s_full = chunked(q, k, v, g, beta, None)
    o1, s1 = chunked(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37], None)
    o2, s2 = chunked(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], beta[:, 37:], s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s2, s_full, atol=2e-5, rtol=1e-4)


def test_chunk_op_in_the_real_head_shape():
    """Dk = Dv = 128 (the register-blocked matmul paths), bf16 in and out, two sequences, a partial chunk."""
    run = _chunked("op")
    q, k, v, g, beta, s0 = _inputs(2, 130, 2, 4, 128, 128, seed=3)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    o, s = run(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, s0)
    assert o.dtype == torch.bfloat16
    qb, kb, vb = (t.bfloat16().float() for t in (q, k, v))
    o_ref_b, _ = recurrent_gated_delta_rule(qb, kb, vb, g, beta, s0)
    torch.testing.assert_close(o.float(), o_ref_b, atol=1e-2, rtol=1e-2)
    o32, s32 = run(q, k, v, g, beta, s0)
    torch.testing.assert_close(o32, o_ref, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(s32, s_ref, atol=5e-5, rtol=1e-4)


def test_bf16_inputs_keep_fp32_state():
    q, k, v, g, beta, s0 = _inputs(1, 20, 2, 2, 16, 16)
    o, s = chunk_gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta.bfloat16(), s0)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, _ = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    assert (o.float() - o_ref).abs().max() < 0.05


def test_conv1d_pieces_equal_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 12, generator=g)
    w = torch.randn(12, 4, generator=g)
    zero = torch.zeros(2, 12, 3)
    y_full, s_full = causal_conv1d(x, w, zero)
    # reference: zero-padded causal depthwise convolution, then SiLU
    ref = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (3, 0)), w.unsqueeze(1),
                                     groups=12)
    torch.testing.assert_close(y_full, torch.nn.functional.silu(ref).transpose(1, 2))
    state, pieces = zero, []
    for a, b in [(0, 1), (1, 9), (9, 10), (10, 30)]:
        y, state = causal_conv1d(x[:, a:b], w, state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), y_full)
    torch.testing.assert_close(state, s_full)


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_op_matches_reference(dtype):
    """The one-pass C++ prefill conv (ops/csrc/conv.cpp) against the torch reference, prompts cut into pieces
    shorter and longer than the kernel (the state carries across), from a non-zero state."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 48, generator=g).to(dtype)
    w = torch.randn(48, 4, generator=g)
    state = ref_state = torch.randn(2, 48, 3, generator=g).to(dtype)
    for a, b in [(0, 2), (2, 3), (3, 20), (20, 40)]:
        y, state = torch.ops.deltarun.causal_conv1d_silu(x[:, a:b], w, state)
        y_ref, ref_state = causal_conv1d_reference(x[:, a:b], w, ref_state)
        assert y.dtype == dtype and state.shape == ref_state.shape
        torch.testing.assert_close(y, y_ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
        assert torch.equal(state, ref_state)  # the newest inputs, copied


@pytest.mark.parametrize("hk,hv", [(2, 2), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_decode_step_equals_recurrent_rule(hk, hv, dtype):
    """The decode fast path (one read of the state, updated in place on a view of a slot pool)."""
    q, k, v, g, beta, _ = _inputs(3, 1, hk, hv, 16, 24)
    # strided like the model's (q, k, v split from one projection per row)
    q, k, v = (torch.cat([x, x], dim=-1)[..., : x.shape[-1]].to(dtype) for x in (q, k, v))
    pool = torch.randn(5, 3, hv, 16, 24) * 0.1  # the batch's states: a view into a larger tensor
    state0 = pool[2].clone()
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, state0)
    view = pool[2]
    o = gated_delta_step_(q, k, v, g, beta, view)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(pool[2], s_ref, rtol=1e-5, atol=1e-5)  # updated in place, in fp32
