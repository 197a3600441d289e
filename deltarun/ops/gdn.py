"""Gated delta rule (the recurrence inside Gated DeltaNet), in plain torch.

Per value head, with state S [Dk, Dv] (fp32), for each token t:
    S = exp(g_t) * S                         (decay)
    S = S + k_t ⊗ beta_t * (v_t - S^T k_t)   (delta-rule write)
    o_t = S^T (q_t / sqrt(Dk))
q and k are L2-normalised here (as fla's `use_qk_l2norm_in_kernel=True`); when there are fewer q/k
heads than v heads each q/k head serves `Hv // Hk` consecutive v heads.

Two forms with one signature and the same result:
  * `chunk_gated_delta_rule`   — prefill: blocks of `chunk_size` tokens via the UT transform (torch, or
    the C++ op of ops/csrc/gdn_chunk.cpp on the CPU).
  * `recurrent_gated_delta_rule` — decode: token by token (the reference for the chunked form too).
And the whole decode token of a DeltaNet layer between its projections (conv step, gates, rule, output
norm): `decode_step_reference` in torch, `decode_step` = the fused CPU op (ops/csrc/gdn.cpp) where built.
Shapes: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; state [B, Hv, Dk, Dv] fp32.
Both return (o [B, T, Hv, Dv] in v's dtype, final state [B, Hv, Dk, Dv] fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


def _prepare(q, k, v, g, beta):
    """fp32, L2-normalised and scaled q/k expanded to the v heads, head-major [B, H, T, D]."""
    hk, hv = k.shape[2], v.shape[2]
    if hk != hv:
        q = q.repeat_interleave(hv // hk, dim=2)
        k = k.repeat_interleave(hv // hk, dim=2)
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * q.shape[-1] ** -0.5
    return q, k, v, g.transpose(1, 2).float(), beta.transpose(1, 2).float()


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule. See the module docstring for shapes."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    s = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float32, device=v.device) if state is None \
        else state.float()
    out = torch.empty_like(v)
    decay = g.exp()
    for i in range(t):
        s = s * decay[:, :, i, None, None]
        k_i = k[:, :, i]
        delta = (v[:, :, i] - torch.einsum("bhkv,bhk->bhv", s, k_i)) * beta[:, :, i, None]
        s = s + k_i.unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, :, i] = torch.einsum("bhkv,bhk->bhv", s, q[:, :, i])
    return out.transpose(1, 2).to(out_dtype), s


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule for prefill (any T, zero-padded to whole chunks internally): on the CPU the
    C++ op (ops/csrc/gdn_chunk.cpp, chunks of 64, one task per sequence and head) where the kernels are
    built, else `chunk_gated_delta_rule_torch`."""
    if (chunk_size == 64 and q.device.type == "cpu" and not torch.is_grad_enabled() and kernels.available()
            and q.dtype == k.dtype == v.dtype):
        if state is None:
            state = torch.zeros(v.shape[0], v.shape[2], k.shape[3], v.shape[3])
        return torch.ops.deltarun.gdn_chunk_prefill(q, k, v, g, beta, state)
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, state, chunk_size)


def _chunks(q, k, v, g, beta, c: int) -> tuple:
    """The prepared [B, H, T, ·] inputs cut into n chunks of c positions ([B, H, n, c, ·]; T zero-padded), and n."""
    b, h, t = k.shape[:3]
    pad = (-t) % c
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // c
    q, k, v = (x.reshape(b, h, n, c, -1) for x in (q, k, v))
    return (q, k, v, g.reshape(b, h, n, c), beta.reshape(b, h, n, c), n)


def chunk_gated_delta_rule_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunk_gated_delta_rule` in torch ops (batched over sequences, heads and chunks)."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    c = chunk_size
    q, k, v, g, beta, n = _chunks(q, k, v, g, beta, c)

    gc = g.cumsum(-1)  # log of the decay from the chunk start to each position
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(gc_i - gc_j) for j <= i, else 0 (masked before exp: no overflow)
    decay = (gc.unsqueeze(-1) - gc.unsqueeze(-2)).masked_fill_(~causal, float("-inf")).exp_()
    k_beta = k * beta.unsqueeze(-1)
    eg = gc.exp()
    # 3-D views for bmm, which reads transposed operands in place (5-D matmul would copy them)
    m = b * h * n
    k3 = k.reshape(m, c, dk).transpose(1, 2)
    # UT transform: T = (I + strictly_lower(k_beta k^T * decay))^-1 folds the chunk's delta-rule writes into
    # matmuls: u = T (v β), w = T (k β e^gc). T is solved for once, against the identity (small copies for
    # LAPACK's column-major layout), and applied to both right-hand sides in one batched matmul.
    system = torch.bmm(k_beta.reshape(m, c, dk), k3).mul_(decay.view(m, c, c))
    eye = torch.eye(c, dtype=system.dtype, device=system.device).expand_as(system)
    tinv = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True)
    rhs = torch.empty(b, h, n, c, dv + dk, dtype=torch.float32, device=v.device)
    torch.mul(v, beta.unsqueeze(-1), out=rhs[..., :dv])
    torch.mul(k_beta, eg.unsqueeze(-1), out=rhs[..., dv:])
    u, w = torch.bmm(tinv, rhs.view(m, c, dv + dk)).view(b, h, n, c, dv + dk).split([dv, dk], dim=-1)
    intra = torch.bmm(q.reshape(m, c, dk), k3).mul_(decay.view(m, c, c)).view(b, h, n, c, c)
    q_decayed = q * eg.unsqueeze(-1)
    k_to_end = (k * (gc[..., -1:] - gc).exp_().unsqueeze(-1)).transpose(-1, -2)
    chunk_decay = gc[..., -1].exp()  # [B, H, n]
    # the inter-chunk recurrence as [B·H] batched matmuls, each product accumulated into its output
    bh = b * h
    s = (torch.zeros(b, h, dk, dv, dtype=torch.float32, device=v.device) if state is None
         else state.float().clone()).view(bh, dk, dv)
    out = torch.empty(b, h, n, c, dv, dtype=torch.float32, device=v.device)
    v_new = torch.empty(bh, c, dv, dtype=torch.float32, device=v.device)
    for i in range(n):
        torch.baddbmm(u[:, :, i].reshape(bh, c, dv), w[:, :, i].reshape(bh, c, dk), s, alpha=-1, out=v_new)
        o_i = torch.bmm(q_decayed[:, :, i].reshape(bh, c, dk), s)
        out[:, :, i] = o_i.baddbmm_(intra[:, :, i].reshape(bh, c, c), v_new).view(b, h, c, dv)
        s.mul_(chunk_decay[:, :, i].reshape(bh, 1, 1)).baddbmm_(k_to_end[:, :, i].reshape(bh, dk, c), v_new)
    s = s.view(b, h, dk, dv)
    out = out.reshape(b, h, n * c, dv)[:, :, :t]
    return out.transpose(1, 2).to(out_dtype), s


def gated_delta_step_(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
) -> torch.Tensor:
    """One decode token (T = 1), updating `state` [B, Hv, Dk, Dv] fp32 IN PLACE (it may be a view of the
    state pool); returns o [B, 1, Hv, Dv]. Same math as `recurrent_gated_delta_rule`, reordered so the
    state is read in one pass and updated in place: with S' = e^g·S + k ⊗ δ,
        δ = β (v − e^g·Sᵀk),   o = S'ᵀq = e^g·Sᵀq + (k·q) δ."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)  # [B, H, 1, D], g/beta [B, H, 1]
    b, h, _, dk = k.shape
    dv = v.shape[-1]
    s = state.view(b * h, dk, dv) if state.is_contiguous() else state.reshape(b * h, dk, dv)
    decay = g.exp().reshape(b * h, 1, 1)
    kq = torch.cat([k, q], dim=2).view(b * h, 2, dk)
    read = torch.bmm(kq, s) * decay  # [BH, 2, Dv]: e^g·Sᵀk, e^g·Sᵀq in one pass over S
    delta = (v.reshape(b * h, 1, dv) - read[:, :1]) * beta.reshape(b * h, 1, 1)
    o = read[:, 1:] + (k * q).sum(-1).reshape(b * h, 1, 1) * delta
    s.mul_(decay).baddbmm_(k.reshape(b * h, dk, 1), delta)
    if s.data_ptr() != state.data_ptr() or not state.is_contiguous():
        state.copy_(s.view_as(state))
    return o.view(b, h, 1, dv).transpose(1, 2).to(out_dtype)


def rms_norm_gated(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * rmsnorm(x) * silu(z)` over the last dim (the DeltaNet output norm), in x's dtype, rounded
    where the reference implementation rounds (normalised x back to x's dtype before the weight)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((weight * xf.to(dtype)) * F.silu(z.float())).to(dtype)


def decode_step_reference(
    mixed: torch.Tensor, conv_pool: torch.Tensor, conv_w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, rec_pool: torch.Tensor, slots: torch.Tensor | slice, hk: int,
    z: torch.Tensor, norm_w: torch.Tensor, eps: float, snap: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Gated DeltaNet decode token after the input projections, in torch: conv1d step + SiLU on
    mixed [B, C] (= in_proj_qkv(x), C = 2·Hk·Dk + Hv·Dv) against conv_pool[slots] [B, C, K−1], gates from
    a, b [B, Hv] (in_proj_a/b outputs, fp32), the delta rule on rec_pool[slots] [B, Hv, Dk, Dv] fp32, and
    the gated RMSNorm with z [B, Hv·Dv] → o [B, Hv·Dv] in mixed's dtype, ready for out_proj. Both pools
    are advanced (in place where `slots` is a slice); `snap` [B, Hv, Dk, Dv] fp32, if given, receives a copy
    of the new recurrent states."""
    bsz = mixed.shape[0]
    hv, dk, dv = rec_pool.shape[1:]
    conv_state = conv_pool[slots]  # [B, C, K-1]
    window = torch.cat([conv_state, mixed.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    conv_pool[slots] = window[:, :, 1:]
    qkv = F.silu((window.float() * conv_w.float()).sum(-1)).to(mixed.dtype)  # [B, C]
    q, k, v = torch.split(qkv, [hk * dk, hk * dk, hv * dv], dim=-1)
    beta = b.sigmoid().view(bsz, 1, hv)
    g = (-A_log.float().exp() * F.softplus(a + dt_bias.float())).view(bsz, 1, hv)
    state = rec_pool[slots]  # a view of the pool when `slots` is a slice
    o = gated_delta_step_(q.reshape(bsz, 1, hk, dk), k.reshape(bsz, 1, hk, dk), v.reshape(bsz, 1, hv, dv),
                          g, beta, state)
    if not isinstance(slots, slice):
        rec_pool[slots] = state
    if snap is not None:
        snap.copy_(state)
    return rms_norm_gated(o.reshape(bsz, hv, dv), z.view(bsz, hv, dv), norm_w, eps).reshape(bsz, hv * dv)


def decode_step(
    mixed: torch.Tensor, conv_pool: torch.Tensor, conv_w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, rec_pool: torch.Tensor, slots: torch.Tensor | slice, hk: int,
    z: torch.Tensor, norm_w: torch.Tensor, eps: float, snap: torch.Tensor | None = None,
) -> torch.Tensor:
    """`decode_step_reference`, as one fused C++ op on the CPU where the kernels are built (ops/csrc/gdn.cpp)."""
    if (mixed.device.type == "cpu" and mixed.dtype in (torch.float32, torch.bfloat16) and kernels.available()
            and _state_ok(conv_pool, rec_pool, mixed, norm_w, z) and (snap is None or snap.is_contiguous())):
        if isinstance(slots, slice):
            slots = torch.arange(slots.start, slots.stop)
        return torch.ops.deltarun.gdn_decode_(
            mixed.contiguous(), conv_pool, conv_w.contiguous(), a.contiguous(), b.contiguous(), A_log.float(),
            dt_bias.float(), rec_pool, slots, hk, z.contiguous(), norm_w.contiguous(), eps, snap)
    return decode_step_reference(mixed, conv_pool, conv_w, a, b, A_log, dt_bias, rec_pool, slots, hk, z, norm_w, eps,
                                 snap)


def _state_ok(conv_pool: torch.Tensor, rec_pool: torch.Tensor, mixed: torch.Tensor, norm_w: torch.Tensor,
              z: torch.Tensor) -> bool:
    return (conv_pool.dtype == mixed.dtype == norm_w.dtype == z.dtype and conv_pool.is_contiguous()
            and rec_pool.dtype == torch.float32 and rec_pool.is_contiguous())
