"""What the plan hands an operator's ``estimate`` hook and takes back (the hook protocol itself is on
:class:`forgeline.registry.OperatorSpec`): the plan computes nothing kind-specific, each kind's
operator package estimates its own stages from the model's shape and the workflow's datasets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forgeline.plan._estimates import MemoryEstimate

__all__ = ["EstimateInputs", "StageEstimate", "dataset_size"]


@dataclass(frozen=True)
class EstimateInputs:
    device: str  # "cpu" | "gpu": the workflow's resources.device
    dataset_path: Callable[[str], Path]  # a dataset name under data: -> its file


@dataclass(frozen=True)
class StageEstimate:
    memory: MemoryEstimate | None = None  # per device (per GPU, or host memory on CPU)
    tokens: int | None = None  # tokens processed (training: seen tokens)
    flops: float | None = None  # model FLOPs; the plan turns them into GPU-hours


def dataset_size(path: Path) -> tuple[int, int]:
    """(non-empty lines, bytes) of a JSONL dataset file."""
    rows = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                rows += 1
    return rows, path.stat().st_size
