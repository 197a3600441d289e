"""Machine-independent accuracy checks for fp32 results: against an fp64 evaluation of the reference.

Two fp32 evaluations of the same function (ours, transformers', chunked or whole) differ only in summation
order and kernel choice, which change with the CPU (AVX2, AVX-512, oneDNN's blocking for each shape). A
fixed bound found on one machine does not hold on another; what holds everywhere is that an fp32 result
is as close to the fp64 evaluation as the reference implementation's own fp32 result is on that machine:
both errors are sums of the same kind of roundings (≤ u = 2⁻²⁴ relative per operation) through the same
operations, so their maxima over many outputs differ by a small factor, not by orders of magnitude.
"""
from __future__ import annotations

import torch

U = 2.0 ** -24  # fp32 unit roundoff
FACTOR = 4.0  # two fp32 evaluations' max errors over ≥ hundreds of outputs: within 4× of each other
FLOOR_ULPS = 64  # where the reference happens to be nearly exact: a few roundings at the output's scale


def fp32_error_bound(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """The error an fp32 evaluation may have here: FACTOR × the reference's own fp32 error against its
    fp64 evaluation, floored at FLOOR_ULPS roundings of the output's largest magnitude."""
    own = (ref32.double() - ref64).abs().max().item()
    return FACTOR * own + FLOOR_ULPS * U * ref64.abs().max().item()


def assert_fp32_accurate(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, what: str = "") -> float:
    """got (an fp32 result) within `fp32_error_bound` of the fp64 reference; returns the error."""
    err = (got.double() - ref64).abs().max().item()
    bound = fp32_error_bound(ref32, ref64)
    assert err <= bound, f"{what}: max |Δ| to fp64 {err:.3g} > bound {bound:.3g} (reference fp32 error ×{FACTOR})"
    return err
