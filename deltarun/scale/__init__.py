"""Past one machine: `deltarun serve --ray` (Ray Serve replicas, each owning an engine) and `deltarun batch`
(OpenAI Batch files, locally or over a Ray Data actor pool).

Ray is optional (`pip install 'deltarun[ray]'`): nothing here imports it at module load except the modules
named ray_*.py and routes.py, which only the `--ray` paths import. `require_ray` is the one check the CLI
makes first, so a missing Ray is one line and exit code 1, like every other user error.
"""
from __future__ import annotations

INSTALL_HINT = "Ray is not installed: pip install 'deltarun[ray]' (Ray Serve and Ray Data) to use --ray"


class RayMissing(ValueError):
    """`--ray` without Ray installed (a ValueError: the CLI prints it as one line, exit code 1)."""


def require_ray() -> None:
    """Raise `RayMissing` (with the install hint) unless Ray Serve and Ray Data import."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError:
        raise RayMissing(INSTALL_HINT) from None
