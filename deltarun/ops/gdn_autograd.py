"""The DeltaNet ops in a form autograd can train through, over packed sequences (deltarun/train/).

`chunk_gated_delta_rule_autograd`: the chunked gated delta rule of ops/gdn.py (`chunk_gated_delta_rule_torch`,
same UT-transform math, same shapes) written without in-place ops or `out=` buffers, so backward works; the
recurrent state is reset to zero at the chunks `resets` marks, so several sequences laid end to end (each
starting on a chunk boundary) run in one call and carry nothing into each other.
`causal_conv1d_packed`: the causal depthwise conv1d + SiLU of ops/conv1d.py over sequences laid end to end,
each starting from a zero state (a sequence never sees the previous one's last inputs).
Inference paths (state in/out, C++ kernels) stay in ops/gdn.py and ops/conv1d.py; this file has no state I/O.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gdn import _chunks, _prepare


def chunk_gated_delta_rule_autograd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    resets: list[bool] | None = None, chunk_size: int = 64,
) -> torch.Tensor:
    """q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv] → o [B, T, Hv, Dv] in v's dtype, from a zero
    state. `resets[i]`: chunk i (tokens i·chunk_size …) starts a new sequence (state zeroed before it)."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    c = chunk_size
    q, k, v, g, beta, n = _chunks(q, k, v, g, beta, c)

    gc = g.cumsum(-1)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = (gc.unsqueeze(-1) - gc.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta.unsqueeze(-1)
    kt = k.transpose(-1, -2)
    # UT transform (see ops/gdn.py): only the strictly lower part enters the unit-triangular solve; masking it
    # explicitly keeps the diagonal and upper entries out of the gradient too
    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    system = ((k_beta @ kt) * decay).masked_fill(~strict, 0.0)
    eye = torch.eye(c, dtype=system.dtype, device=system.device).expand_as(system)
    tinv = torch.linalg.solve_triangular(system + eye, eye, upper=False, unitriangular=True)
    u = tinv @ (v * beta.unsqueeze(-1))
    w = tinv @ (k_beta * gc.exp().unsqueeze(-1))
    intra = (q @ kt) * decay
    q_decayed = q * gc.exp().unsqueeze(-1)
    k_to_end = (k * (gc[..., -1:] - gc).exp().unsqueeze(-1)).transpose(-1, -2)
    chunk_decay = gc[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]
    s = torch.zeros(b, h, dk, dv, dtype=torch.float32, device=v.device)
    outs = []
    for i in range(n):
        if resets is not None and resets[i] and i > 0:
            s = torch.zeros_like(s)
        v_new = u[:, :, i] - w[:, :, i] @ s
        outs.append(q_decayed[:, :, i] @ s + intra[:, :, i] @ v_new)
        s = s * chunk_decay[:, :, i] + k_to_end[:, :, i] @ v_new
    out = torch.stack(outs, dim=2).reshape(b, h, n * c, dv)[:, :, :t]
    return out.transpose(1, 2).to(out_dtype)


def causal_conv1d_packed(x: torch.Tensor, weight: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal depthwise conv1d) of x [B, T, C] with weight [C, K], summed in fp32, rounded to x's dtype.
    `starts` [T] bool: positions where a new sequence begins; a tap reaching back across one reads zeros."""
    t, kk = x.shape[1], weight.shape[1]
    xf, wf = x.float(), weight.float()
    padded = F.pad(xf, (0, 0, kk - 1, 0))  # [B, K-1+T, C]: zeros before the first token
    seg = None if starts is None else torch.cumsum(starts.long(), 0)  # sequence number of each position
    y = padded[:, kk - 1:] * wf[:, kk - 1]
    for back in range(1, kk):  # tap reading `back` positions earlier
        tap = padded[:, kk - 1 - back: kk - 1 - back + t] * wf[:, kk - 1 - back]
        if seg is not None:
            same = torch.zeros(t, dtype=torch.bool, device=x.device)
            same[back:] = seg[back:] == seg[:-back]
            tap = tap * same[None, :, None]
        y = y + tap
    return F.silu(y).to(x.dtype)
