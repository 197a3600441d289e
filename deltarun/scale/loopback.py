"""Starting or joining Ray so that nothing listens beyond where it should: `ray_init` and `bind_grpc_to_node`.

Two places in Ray pick an address on their own, and both are handled here (not patched at import time):
- `ray.init(address="127.0.0.1:PORT")` rewrites a loopback address to the machine's routable IP before
  connecting (ray._private.services.resolve_ip_for_localhost), so joining a cluster that listens on loopback
  only would hang. Ray's switch for "this machine only" is `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the mode it
  uses by default on laptops): the node's address is then 127.0.0.1 and nothing is rewritten. We set it
  whenever the cluster is local (no `--address`, or a loopback one); a real cluster address leaves Ray as is.
- Every Serve replica starts an inter-deployment gRPC server on `[::]:0` (all interfaces, unused unless
  RAY_SERVE_USE_GRPC_BY_DEFAULT=1). `bind_grpc_to_node` (called in our deployments' constructors, which run
  before that server starts) binds it to the node's own address instead: the one Ray advertises for it, so
  handles that do use it still reach it; on a loopback cluster that is 127.0.0.1.
"""
from __future__ import annotations

import ipaddress
import os
from typing import Any

LOCAL_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode (node IP 127.0.0.1)
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0",  # no usage report leaves the machine
             "RAY_DEDUP_LOGS": "1"}


def is_loopback_address(address: str | None) -> bool:
    """Whether a Ray address (`host:port`, `ray://host:port`, `auto`) is on this machine's loopback."""
    if not address or address in ("local",):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_env(address: str | None = None) -> dict[str, str]:
    """The environment variables a Ray process on a local (loopback) cluster needs; fewer for a real one."""
    env = dict(QUIET_ENV)
    if is_loopback_address(address):
        env[LOCAL_MODE_ENV] = "0"
    return env


def ray_init(address: str | None = None, *, num_cpus: int | None = None,
             object_store_memory: int = 200 << 20, **kwargs: Any) -> None:
    """Join the cluster at `address`, or start a local Ray on loopback (dashboard off, small object store).
    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when imported: callers set `local_env` before importing it."""
    os.environ.update(local_env(address))
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, **kwargs)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=object_store_memory, log_to_driver=False, **kwargs)


def bind_grpc_to_node() -> None:
    """In a Serve replica's process: its inter-deployment gRPC server binds to the node's address, not `[::]`.

    Serve calls `add_port_to_grpc_server(server, "[::]:0")` after the deployment's constructor has run; the
    name is looked up in ray.serve._private.replica at that moment, so wrapping it here changes that one call.
    If a Ray release renames it, this does nothing (the server binds as Ray decides) rather than fail."""
    try:
        import ray
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "deltarun_bound", False):
        return
    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def bound(server: Any, address: str) -> int:
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    bound.deltarun_bound = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bound
