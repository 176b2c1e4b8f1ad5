"""The runtime: a thin driver over Ray that runs a planned workflow stage by stage.

Each stage is one ``@ray.remote`` task (operators that need several workers start Ray Train inside
it). Finished stages are published atomically under content-addressed cache keys, so reruns skip them
and a crashed run resumes from the first unfinished stage. Operators see only :mod:`.context`.
"""

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
from forgeline.runtime._ray import RaySettings
from forgeline.runtime.context import (
    DatasetInput,
    GateFailed,
    MemorySink,
    OperatorError,
    StageContext,
    StageResult,
)

__all__ = [
    "SUBMITTER_ENV",
    "TAG_SUBMITTER",
    "DatasetInput",
    "Driver",
    "GateFailed",
    "MemorySink",
    "OperatorError",
    "RaySettings",
    "RunSettings",
    "RunSummary",
    "StageContext",
    "StageFailed",
    "StageOutcome",
    "StageResult",
    "make_planner",
    "reap_dead_drivers",
    "run_workflow",
    "tracking_settings",
]
