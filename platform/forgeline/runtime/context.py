"""The contract between the runtime and an operator: what ``run(ctx)`` receives and returns.

An operator is a function ``run(ctx: StageContext) -> StageResult``. The context hands it the typed
stage spec, resolved inputs (local paths of upstream outputs, base models and datasets), a staging
directory for outputs (published atomically by the runtime once ``run`` returns), and a metrics seam
that the runtime binds to the stage's MLflow child run. Operators never talk to Ray and never publish
outputs themselves. This module imports nothing heavy so operators and tests can use it anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from forgeline.errors import ForgelineError

__all__ = [
    "DatasetInput",
    "GateFailed",
    "MetricSink",
    "OperatorError",
    "StageContext",
    "StageResult",
]


class OperatorError(ForgelineError, RuntimeError):
    """A stage failed for a reason the user can act on; the message is shown without a traceback."""


class GateFailed(OperatorError):
    """A quality gate rejected the stage's result; ``metrics`` holds the numbers that decided it."""

    def __init__(self, message: str, metrics: Mapping[str, float] | None = None) -> None:
        super().__init__(message)
        self.metrics = dict(metrics or {})


class MetricSink(Protocol):
    """Where an operator's metrics, params and tags go (MLflow child run in production)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_table(self, columns: Mapping[str, Sequence[Any]], artifact_file: str) -> None: ...


@dataclass
class MemorySink:
    """The cheapest MetricSink: keeps everything in lists. For unit tests of operator logic."""

    metrics: list[tuple[dict[str, float], int | None]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tables: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def log_table(self, columns: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        self.tables[artifact_file] = {k: list(v) for k, v in columns.items()}

    def last(self, name: str) -> float | None:
        for values, _ in reversed(self.metrics):
            if name in values:
                return values[name]
        return None


@dataclass(frozen=True)
class DatasetInput:
    """A named dataset from the workflow's ``data:`` section, validated before the run started."""

    name: str
    path: Path
    format: str  # "sft" | "preference" | "text"
    sha256: str
    rendering: str = "auto"  # "auto" | "chat_template" | "raw" (forgeline_operators.data)


@dataclass
class StageResult:
    """What an operator returns.

    ``outputs`` maps output names to a directory under ``ctx.output_dir`` (published atomically with a
    sha256 manifest) or to a plain value (str/int/float, e.g. a registered model version).
    ``metrics`` are the stage's final metrics (also logged to MLflow and shown in the progress table).
    """

    outputs: dict[str, Path | str | int | float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything an operator may use. Built by the runtime inside the Ray worker."""

    stage: Any  # the stage's pydantic model from forgeline.spec (e.g. EvaluateStage)
    workflow: Any  # forgeline.spec.Workflow
    output_dir: Path  # staging directory: write each directory output to output_dir / <name>
    work_dir: Path  # scratch space, deleted after the stage
    sink: MetricSink
    resolve: Callable[[str], Path]  # a Ref value ("${stages.x.outputs.y}", "${model}", a URI) -> local dir
    values: Callable[[str], Any]  # a Ref value -> the upstream plain value (e.g. a version number)
    datasets: Mapping[str, DatasetInput]
    threads: int = 1
    run_id: str | None = None  # MLflow child run of this stage
    tracking_uri: str | None = None
    home: Path | None = None  # the Forgeline state directory (.forgeline): endpoints, logs
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("forgeline.stage"))
    # Metrics of every finished upstream stage (direct or transitive), by stage name.
    upstream_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def input_path(self, ref: str) -> Path:
        """Local directory for a reference field of the stage (materialized if remote)."""
        return self.resolve(ref)

    def dataset(self, name: str) -> DatasetInput:
        try:
            return self.datasets[name]
        except KeyError:
            raise OperatorError(f"dataset {name!r} is not declared under data:") from None

    def read_rows(self, name: str) -> list[dict[str, Any]]:
        """The rows of a dataset, exactly the file the run was planned (and keyed) with."""
        from forgeline.artifacts import sha256_file
        from forgeline.spec import WorkflowError
        from forgeline.spec._datasets import read_dataset

        dataset = self.dataset(name)
        # A file changed since planning would make the stage's results and lineage lie about its data.
        if sha256_file(dataset.path) != dataset.sha256:
            raise OperatorError(f"dataset {dataset.name!r} changed since the run was planned: {dataset.path}")
        try:
            return read_dataset(dataset.path, dataset.format, name=dataset.name)
        except WorkflowError as e:
            raise OperatorError(str(e)) from None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.sink.log_metrics(metrics, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.sink.log_params(params)

    def log_table(self, columns: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """Columns of equal length as an MLflow table artifact (the UI's artifact view shows it)."""
        self.sink.log_table(columns, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.sink.set_tags(tags)
