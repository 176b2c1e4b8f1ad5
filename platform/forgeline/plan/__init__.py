"""The plan: DAG order, per-stage resources (GPUs = tp*pp*dp), memory and GPU-hour estimates, cache
keys and cache status, and the problems that must stop a run before any compute starts."""

from forgeline.plan._estimates import MemoryEstimate, ModelShape, human_bytes, human_count
from forgeline.plan._keys import KeyInputs, stage_params
from forgeline.plan._plan import Plan, Planner, StagePlan, build_plan, topological_order
from forgeline.plan._select import Selection, SelectionError

__all__ = [
    "KeyInputs",
    "MemoryEstimate",
    "ModelShape",
    "Plan",
    "Planner",
    "Selection",
    "SelectionError",
    "StagePlan",
    "build_plan",
    "human_bytes",
    "human_count",
    "stage_params",
    "topological_order",
]
