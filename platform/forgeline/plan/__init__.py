"""The plan: DAG order, per-stage resources, memory and GPU-hour estimates, cache keys and cache
status, and the problems that must stop a run before any compute starts. What is particular to a
kind (its GPUs, its estimate, its own checks) comes from its operator's hooks; the estimate helpers
exported here (``finetune_memory``, ``inference_memory``, ``training_flops``) are for those hooks."""

from forgeline.plan._estimates import (
    GiB,
    MemoryEstimate,
    ModelShape,
    finetune_memory,
    human_bytes,
    human_count,
    inference_memory,
    training_flops,
)
from forgeline.plan._hooks import EstimateInputs, StageEstimate, dataset_size
from forgeline.plan._keys import KeyInputs, stage_params
from forgeline.plan._plan import Plan, Planner, StagePlan, build_plan, topological_order
from forgeline.plan._select import Selection, SelectionError

__all__ = [
    "EstimateInputs",
    "GiB",
    "KeyInputs",
    "MemoryEstimate",
    "ModelShape",
    "Plan",
    "Planner",
    "Selection",
    "SelectionError",
    "StageEstimate",
    "StagePlan",
    "build_plan",
    "dataset_size",
    "finetune_memory",
    "human_bytes",
    "human_count",
    "inference_memory",
    "stage_params",
    "topological_order",
    "training_flops",
]
