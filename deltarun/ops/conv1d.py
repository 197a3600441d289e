"""Causal depthwise conv1d with a carried state (the short convolution in front of Gated DeltaNet).

`causal_conv1d(x [B, T, C], weight [C, K], state [B, C, K-1]) -> (silu(conv(x)) [B, T, C], new state)`:
the state holds the last K-1 inputs of the sequence so far (zeros at the start), so running a prompt
in pieces gives the same result as running it whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    t, c = x.shape[1], x.shape[2]
    window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    new_state = window[:, :, window.shape[-1] - state.shape[-1]:]
    y = F.conv1d(window.to(weight.dtype), weight.unsqueeze(1), groups=c)  # [B, C, T]
    return F.silu(y[:, :, -t:]).transpose(1, 2).to(x.dtype), new_state
