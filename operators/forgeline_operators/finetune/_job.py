"""The one picklable description of a training run, shared by the in-process and Ray Train paths.

The operator builds a :class:`TrainJob` in the stage's Ray task (inputs resolved, rows validated and
tokenised, checkpoint directory chosen); ``train_entry`` runs it on every data-parallel worker, or
in-process for ``dp: 1``. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from forgeline_operators.finetune.spec import FinetuneStage
from forgeline_operators.lib.train_rows import Features

__all__ = ["MetricsTarget", "Schedule", "TrainJob", "TrainOutcome"]


@dataclass(frozen=True)
class MetricsTarget:
    """Where rank 0 of a Ray Train run logs step metrics: the stage's MLflow run."""

    tracking_uri: str | None
    run_id: str | None


@dataclass(frozen=True)
class Schedule:
    """Step arithmetic decided once by the operator, so every worker agrees on it."""

    total_steps: int
    logging_steps: int
    save_steps: int


@dataclass(frozen=True)
class TrainJob:
    stage: FinetuneStage
    base_dir: Path
    reference_dir: Path | None  # explicit dpo.reference; None: the starting model (or adapters off)
    features: Features
    pad_id: int
    checkpoint_dir: Path  # durable, keyed by the stage's cache key
    output_dir: Path  # the stage's staging directory; rank 0 writes adapter/ and merged/ here
    merge: bool
    device: str  # "cpu" | "gpu"
    world_size: int
    threads: int
    schedule: Schedule
    metrics: MetricsTarget = field(default_factory=lambda: MetricsTarget(None, None))

    @property
    def adapter(self) -> bool:
        return self.stage.uses_adapter


@dataclass
class TrainOutcome:
    """What rank 0 reports back: final metrics and where training started from."""

    metrics: dict[str, float]
    resumed_from_step: int
    outputs: list[str]  # directory outputs written under output_dir
    history: list[dict[str, float]] = field(default_factory=list)  # logged steps, in order
