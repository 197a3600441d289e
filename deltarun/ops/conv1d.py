"""Causal depthwise conv1d with a carried state (the short convolution in front of Gated DeltaNet).

`causal_conv1d(x [B, T, C], weight [C, K], state [B, C, K-1]) -> (silu(conv(x)) [B, T, C], new state)`:
the state holds the last K-1 inputs of the sequence so far (zeros at the start), so running a prompt
in pieces gives the same result as running it whole. `causal_conv1d_reference` in torch; on the CPU the
one-pass C++ op (ops/csrc/conv.cpp) where the kernels are built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cpu" and not torch.is_grad_enabled() and kernels.available():
        return torch.ops.deltarun.causal_conv1d_silu(x, weight, state)
    return causal_conv1d_reference(x, weight, state)


def causal_conv1d_reference(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    t, k = x.shape[1], weight.shape[1]
    window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    new_state = window[:, :, window.shape[-1] - state.shape[-1]:]
    # K shifted products summed in fp32 (as the decode step does): torch's depthwise conv1d has no fast
    # bf16 path on CPUs (a per-channel loop: 85 ms against 7 ms for these K fused multiply-adds at
    # C = 6,144, T = 512), and fp32 sums round once, at the end
    wf, xf = weight.float(), window.float()
    y = xf[..., :t] * wf[:, :1]
    for i in range(1, k):
        y.addcmul_(xf[..., i:i + t], wf[:, i:i + 1])
    return F.silu(y).transpose(1, 2).to(x.dtype), new_state
