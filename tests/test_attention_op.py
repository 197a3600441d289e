"""ops/attention.py against a plain softmax reference: the prefix + diagonal split merged by log-sum-exp (CPU), the
masked path, and the query-block path of long chunks."""
from __future__ import annotations

import pytest
import torch

import deltarun.ops.attention as att


def reference(q, k, v, scale):
    """Explicit causal softmax attention; the T queries are the last T of the S positions."""
    hq, t, s = q.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("t,s", [(1, 9), (7, 7), (7, 30), (20, 50), (2, 3)])
@pytest.mark.parametrize("path", ["split", "masked", "blocks"])
@pytest.mark.parametrize("hkv", [2, 4])
def test_attention_matches_reference(t, s, path, hkv, monkeypatch):
    if path == "split" and not att._flash_lse(torch.zeros(1)):
        pytest.skip("torch has no CPU flash attention returning the log-sum-exp")
    if path != "split":
        monkeypatch.setattr(att, "_flash_lse", lambda q: False)
    if path == "blocks":  # force the long-chunk path: every chunk split into blocks of 3 queries
        monkeypatch.setattr(att, "MASK_ENTRIES", 0)
        monkeypatch.setattr(att, "QUERY_BLOCK", 3)
    g = torch.Generator().manual_seed(t * 100 + s)
    q = torch.randn(2, t, 4, 16, generator=g).transpose(1, 2)  # [B, Hq, T, D] as the model makes it: strided
    k, v = torch.randn(2, hkv, s, 16, generator=g), torch.randn(2, hkv, s, 16, generator=g)
    torch.testing.assert_close(att.attention(q, k, v, 0.25), reference(q, k, v, 0.25), rtol=1e-5, atol=1e-5)


def test_split_in_bf16_is_as_close_as_the_masked_path():
    """bf16 queries deep into a chunk: the split path's error against the fp32 reference is no larger than that of
    the masked SDPA path it replaces (plus a bf16 rounding)."""
    if not att._flash_lse(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("torch has no CPU flash attention returning the log-sum-exp")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, n, 64, generator=g) for h, n in ((8, 64), (2, 700), (2, 700)))
    want = reference(q, k, v, 0.125)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    split = (att.attention(qb, kb, vb, 0.125).float() - want).abs().max()
    masked = (att._masked(qb, kb, vb, 0.125, {"enable_gqa": True}).float() - want).abs().max()
    assert split <= masked + 2 ** -8 * want.abs().max()
