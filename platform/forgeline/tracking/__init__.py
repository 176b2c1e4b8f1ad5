"""Tracking: MLflow runs (a parent per workflow run, a nested child per stage), params, batched
metrics, lineage tags, and registered model versions with aliases. A leaf package: it depends on no
other forgeline layer, and nothing else in forgeline talks to MLflow directly.
"""

from forgeline.tracking._registry import (
    TAG_URI,
    RegisteredVersion,
    get_version,
    register_version,
    version_by_alias,
)
from forgeline.tracking._runs import (
    PARENT_TAG,
    TAG_CACHE_KEY,
    TAG_CACHED,
    TAG_DRIVER_HOST,
    TAG_DRIVER_PID,
    TAG_ERROR,
    TAG_KIND,
    TAG_OPERATOR_VERSION,
    TAG_ORDER,
    TAG_ROLE,
    TAG_STAGE,
    TAG_STATE,
    TAG_WORKFLOW,
    TAG_WORKFLOW_FILE,
    RunSink,
    Tracker,
    flatten,
)
from forgeline.tracking._store import TrackingSettings, default_home, prepare, resolve_settings

__all__ = [
    "PARENT_TAG",
    "TAG_CACHED",
    "TAG_CACHE_KEY",
    "TAG_DRIVER_HOST",
    "TAG_DRIVER_PID",
    "TAG_ERROR",
    "TAG_KIND",
    "TAG_OPERATOR_VERSION",
    "TAG_ORDER",
    "TAG_ROLE",
    "TAG_STAGE",
    "TAG_STATE",
    "TAG_URI",
    "TAG_WORKFLOW",
    "TAG_WORKFLOW_FILE",
    "RegisteredVersion",
    "RunSink",
    "Tracker",
    "TrackingSettings",
    "default_home",
    "flatten",
    "get_version",
    "prepare",
    "register_version",
    "resolve_settings",
    "version_by_alias",
]
