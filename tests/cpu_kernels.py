"""The one rule for tests of the CPU kernels (ops/csrc): skip only where they are not to be built."""
from __future__ import annotations

import pytest


def require_cpu_kernels() -> None:
    """Skip where this machine has no C++ compiler or `DELTARUN_CPU_KERNELS=0` is set; fail where the build
    or its self-check failed on a machine with a compiler (that is a bug users would hit, not a skip)."""
    from deltarun.ops import kernels

    why = kernels.unavailable_reason()
    if why == "no compiler":
        pytest.skip("this machine has no C++ compiler: the CPU kernels are not built (torch's ops run)")
    if why == "off":
        pytest.skip("DELTARUN_CPU_KERNELS=0: the CPU kernels are switched off")
    if why is not None:
        pytest.fail(f"the CPU kernels failed to build or self-check on a machine with a compiler: {why[-3000:]}",
                    pytrace=False)
