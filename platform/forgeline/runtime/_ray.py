"""Ray connection: an embedded local Ray by default, or an existing cluster by address.

Embedded settings come from measurements on 2-core machines (FACTS.md): no dashboard, a small object
store, token auth and usage stats off. Ray is never stopped by us unless we started it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Set before ray is imported anywhere in this process (workers inherit the environment).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start an embedded local Ray
    num_cpus: int | None = None  # embedded: default min(2, cpu count)... at least the biggest stage
    object_store_mb: int = 256
    log_to_driver: bool = False


def ensure_ray(settings: RaySettings) -> bool:
    """Connect or start Ray; returns True when this call started it (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if settings.address:
        ray.init(address=settings.address, log_to_driver=settings.log_to_driver)
        return True
    ray.init(
        num_cpus=settings.num_cpus or max(2, os.cpu_count() or 2),
        include_dashboard=False,
        object_store_memory=settings.object_store_mb * 2**20,
        log_to_driver=settings.log_to_driver,
        configure_logging=False,
    )
    return True
