"""Ray connection: an embedded local Ray by default, or an existing cluster by address.

Embedded settings come from measurements on 2-core machines (FACTS.md): no dashboard unless asked
for, a small object store, usage stats off. The embedded Ray is a single-machine cluster and listens
on loopback only (GCS, raylet, workers, the dashboard and runtime-env agents): anyone who can reach a
Ray port can run code in it, so nothing of it may face the network. Its token auth is off unless
``RAY_AUTH_MODE`` says otherwise (loopback only). A cluster given by address keeps Ray's own
authentication: we never turn it off there. Ray is never stopped by us unless we started it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Set before ray is imported anywhere in this process (workers inherit the environment).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start an embedded local Ray
    num_cpus: int | None = None  # embedded: default min(2, cpu count)... at least the biggest stage
    object_store_mb: int = 256
    log_to_driver: bool = False
    dashboard: bool = False  # embedded: serve Ray's dashboard (on 127.0.0.1) only when asked


def _loopback_only() -> None:
    """Make this process's embedded Ray pick 127.0.0.1 as its node address.

    Ray 2.60 binds its servers to the node address (to localhost when that is loopback), and picks the
    node address from the route to the outside unless single-machine mode is on
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once when ``ray`` is imported: set it in the
    environment for the processes Ray starts, and on the imported constant for this one).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def ensure_ray(settings: RaySettings) -> bool:
    """Connect or start Ray; returns True when this call started it (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if settings.address:
        ray.init(address=settings.address, log_to_driver=settings.log_to_driver)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    _loopback_only()
    ray.init(
        num_cpus=settings.num_cpus or max(2, os.cpu_count() or 2),
        include_dashboard=settings.dashboard,
        dashboard_host=LOOPBACK,
        object_store_memory=settings.object_store_mb * 2**20,
        log_to_driver=settings.log_to_driver,
        configure_logging=False,
        _node_ip_address=LOOPBACK,
    )
    return True
