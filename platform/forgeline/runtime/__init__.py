"""The runtime: a thin driver over Ray that runs a planned workflow stage by stage.

Each stage is one ``@ray.remote`` task (operators that need several workers start Ray Train inside
it). Finished stages are published atomically under content-addressed cache keys, so reruns skip them
and a crashed run resumes from the first unfinished stage. Operators see only :mod:`.context`. The
faces (CLI, REST API) share two services from here: :func:`model_store` (every model store, with the
registry URI schemes) and :func:`cancel_run`.

The names below load on first use (PEP 562): importing :mod:`forgeline.runtime.context`, which every
operator does, no longer imports the driver and Ray with it (~1.8 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forgeline.runtime._cancel import (
        CANCEL_WAIT_S,
        CancelResult,
        NotCancellableHere,
        RunNotFound,
        cancel_run,
    )
    from forgeline.runtime._driver import (
        SUBMITTER_ENV,
        TAG_SUBMITTER,
        Driver,
        RunSettings,
        RunSummary,
        StageFailed,
        StageOutcome,
        make_planner,
        reap_dead_drivers,
        run_workflow,
        tracking_settings,
    )
    from forgeline.runtime._model_store import model_store
    from forgeline.runtime._ray import RaySettings
    from forgeline.runtime.context import (
        DatasetInput,
        GateFailed,
        MemorySink,
        OperatorError,
        StageContext,
        StageResult,
    )

_HOME = {
    "CANCEL_WAIT_S": "forgeline.runtime._cancel",
    "CancelResult": "forgeline.runtime._cancel",
    "NotCancellableHere": "forgeline.runtime._cancel",
    "RunNotFound": "forgeline.runtime._cancel",
    "cancel_run": "forgeline.runtime._cancel",
    "model_store": "forgeline.runtime._model_store",
    "SUBMITTER_ENV": "forgeline.runtime._driver",
    "TAG_SUBMITTER": "forgeline.runtime._driver",
    "Driver": "forgeline.runtime._driver",
    "RunSettings": "forgeline.runtime._driver",
    "RunSummary": "forgeline.runtime._driver",
    "StageFailed": "forgeline.runtime._driver",
    "StageOutcome": "forgeline.runtime._driver",
    "make_planner": "forgeline.runtime._driver",
    "reap_dead_drivers": "forgeline.runtime._driver",
    "run_workflow": "forgeline.runtime._driver",
    "tracking_settings": "forgeline.runtime._driver",
    "RaySettings": "forgeline.runtime._ray",
    "DatasetInput": "forgeline.runtime.context",
    "GateFailed": "forgeline.runtime.context",
    "MemorySink": "forgeline.runtime.context",
    "OperatorError": "forgeline.runtime.context",
    "StageContext": "forgeline.runtime.context",
    "StageResult": "forgeline.runtime.context",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CANCEL_WAIT_S",
    "SUBMITTER_ENV",
    "TAG_SUBMITTER",
    "CancelResult",
    "DatasetInput",
    "Driver",
    "GateFailed",
    "MemorySink",
    "NotCancellableHere",
    "OperatorError",
    "RaySettings",
    "RunNotFound",
    "RunSettings",
    "RunSummary",
    "StageContext",
    "StageFailed",
    "StageOutcome",
    "StageResult",
    "cancel_run",
    "make_planner",
    "model_store",
    "reap_dead_drivers",
    "run_workflow",
    "tracking_settings",
]
