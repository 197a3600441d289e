"""ops/attention.py against a plain softmax reference, including the query-block path of long chunks."""
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


@pytest.mark.parametrize("t,s", [(1, 9), (7, 7), (7, 30), (20, 50)])
@pytest.mark.parametrize("blocks", [False, True])
def test_attention_matches_reference(t, s, blocks, monkeypatch):
    if blocks:  # force the long-chunk path: every chunk split into blocks of 3 queries
        monkeypatch.setattr(att, "MASK_ENTRIES", 0)
        monkeypatch.setattr(att, "QUERY_BLOCK", 3)
    g = torch.Generator().manual_seed(t * 100 + s)
    q = torch.randn(2, 4, t, 16, generator=g)
    k, v = torch.randn(2, 2, s, 16, generator=g), torch.randn(2, 2, s, 16, generator=g)
    torch.testing.assert_close(att.attention(q, k, v, 0.25), reference(q, k, v, 0.25), rtol=1e-5, atol=1e-5)
