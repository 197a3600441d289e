"""The Linear every decoder projection is, and the bf16 routes it can take on the CPU.

`Linear` is nn.Linear (same parameters, same names, so checkpoints load unchanged) whose forward follows the
routes the loader chose for it (`routes` {"decode": …, "prefill": …}, names from ops/routes.py's table);
a freshly built Linear has none and runs F.linear. `delta`: an adapter's output added to the layer's
(the LoRA hook; None: the base model only).

bf16 routes here: `gemv_bf16` (decode rows, csrc/gemv.cpp), and for prefill-sized inputs on CPUs without
hardware bf16 matmul `linear_bf16w` — csrc/fgemm.cpp's GEMM (AVX2), else `linear_via_fp32` (the weight
widened to fp32 for oneDNN) — both the products and fp32 sums of a bf16 GEMM, rounded once.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv, kernels
from .settings import settings

_onednn: dict[str, bool | None] = {}


class Linear(nn.Linear):
    routes: dict[str, str] | None = None  # set by ops/routes.py `assign`
    delta: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        d = None if self.delta is None else self.delta(x)
        return y if d is None else y + d

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routes
        if r is None or x.dtype != torch.bfloat16 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        route = r["decode"] if 0 < rows <= gemv.max_rows() else r["prefill"]
        if route == "gemv_bf16":
            y = gemv.gemv_bf16(x.reshape(rows, -1), self.weight, True)
            if self.bias is not None:
                y += self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        if route == "gemm_bf16w":
            return gemm_bf16w(x, self.weight, self.bias)
        if route == "fp32_widened":
            return linear_via_fp32(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def linear_bf16w(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for bf16 x [..., K] and w [N, K] on CPUs without hardware bf16 matmul: the
    products and fp32 sums of a bf16 GEMM, rounded once. csrc/fgemm.cpp's GEMM widens the weight while
    packing it (AVX2; `DELTARUN_PREFILL_GEMM=0` turns it off); elsewhere `linear_via_fp32`."""
    if kernels.has_bf16w() and w.device.type == "cpu" and w.is_contiguous() and settings().prefill_gemm:
        return gemm_bf16w(x, w, bias)
    return linear_via_fp32(x, w, bias)


def gemm_bf16w(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The bf16-weight prefill GEMM (csrc/fgemm.cpp): x [..., K] bf16 · w [N, K] → [..., N] bf16, rounded once
    (after the bias)."""
    y = gemv.gemm_bf16w(x.reshape(-1, x.shape[-1]), w, bias is None).view(*x.shape[:-1], w.shape[0])
    return y if bias is None else (y + bias.float()).to(x.dtype)


def linear_via_fp32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for bf16 tensors computed in fp32 — the weight widened 8,192 rows at a time, so
    a 248K-row lm_head never has a whole fp32 copy — and rounded back to x's dtype: the same products and
    fp32 sums as a bf16 GEMM."""
    xf, b = x.float(), None if bias is None else bias.float()
    n = w.shape[0]
    if n <= WIDEN_ROWS:
        return _linear_f32(xf, _widened(w), b).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], n)
    for i in range(0, n, WIDEN_ROWS):
        bias_i = None if b is None else b[i:i + WIDEN_ROWS]
        out[..., i:i + WIDEN_ROWS] = _linear_f32(xf, _widened(w[i:i + WIDEN_ROWS]), bias_i)
    return out


def _linear_f32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear for fp32 CPU tensors through oneDNN's GEMM where torch has it (`DELTARUN_ONEDNN=0`: F.linear)."""
    if _onednn.get("ok") is None:
        _onednn["ok"] = torch.backends.mkldnn.is_available() and settings().onednn
    if _onednn["ok"] and w.device.type == "cpu":
        try:
            # the weight stays a dense tensor: oneDNN reads it in place (to_mkldnn would copy it every call)
            y = torch._C._nn.mkldnn_linear(x.reshape(-1, x.shape[-1]).to_mkldnn(), w.contiguous(), None).to_dense()
            y = y.view(*x.shape[:-1], w.shape[0])
            return y if b is None else y + b
        except (RuntimeError, AttributeError):  # a torch without it: F.linear from now on
            _onednn["ok"] = False
    return F.linear(x, w, b)


WIDEN_ROWS = 8192
WIDEN_REUSE = 1 << 26  # elements (256 MB fp32): larger widened weights get a fresh tensor
_scratch = threading.local()


def _widened(w: torch.Tensor) -> torch.Tensor:
    """w in fp32, copied into a scratch buffer reused across calls (one per thread): a fresh tensor per call
    costs its page faults, 11.6 against 2.5 ms for a 6144×1024 weight on a 2-core EPYC."""
    n = w.numel()
    if n > WIDEN_REUSE or w.device.type != "cpu":
        return w.float()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(w.shape).copy_(w)
