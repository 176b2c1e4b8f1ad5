"""Data parallelism: the same ``train_entry`` on ``dp`` Ray Train workers (gloo on CPU, NCCL on GPU).

One Ray Train run per attempt, with a unique name (Ray Train restores a run whose name it has seen);
workers are placed STRICT_PACK, each with the CPUs a stage would get (one GPU each on GPU nodes).
A request the cluster cannot meet fails fast with the numbers; one that is only busy waits at most
``start_timeout_s`` for placement (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, no retries) instead of
forever. Rank 0 logs step metrics straight to the stage's MLflow run and writes the outputs and its
:class:`TrainOutcome` (a JSON file beside the run: like the outputs, this needs the workers to share
the stage's filesystem, which STRICT_PACK on the stage's own node gives on the embedded cluster).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from forgeline.artifacts import write_text_atomic
from forgeline.runtime.context import OperatorError
from forgeline_operators.finetune._job import TrainJob, TrainOutcome

__all__ = ["DataParallel", "run_data_parallel"]

_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class DataParallel:
    """How the workers are laid out (typed, not a dict of options)."""

    def __init__(self, workers: int, cpus_per_worker: float, gpu: bool, start_timeout_s: float) -> None:
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpu = gpu
        self.start_timeout_s = start_timeout_s

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.gpu:
            res["GPU"] = 1
        return res


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train

    from forgeline_operators.finetune.operator import train_entry

    job: TrainJob = config["job"]
    rank0 = ray.train.get_context().get_world_rank() == 0
    sink = None
    if rank0 and job.metrics.tracking_uri and job.metrics.run_id:
        from forgeline.tracking import RunSink, Tracker

        sink = RunSink(Tracker(job.metrics.tracking_uri), job.metrics.run_id)
    outcome = train_entry(job, sink)
    if rank0:  # Ray Train V2 keeps reported metrics only with a checkpoint: hand them over as a file
        write_text_atomic(Path(config["outcome_path"]), json.dumps(asdict(outcome)))


def _check_capacity(layout: DataParallel) -> None:
    import ray

    total = ray.cluster_resources()
    for res, need in layout.resources_per_worker().items():
        if need * layout.workers > total.get(res, 0):
            raise OperatorError(
                f"dp={layout.workers} needs {need * layout.workers:g} {res} "
                f"({need:g} per Ray Train worker) but the Ray cluster has {total.get(res, 0):g} in total"
            )


def run_data_parallel(job: TrainJob, layout: DataParallel, storage: Path) -> TrainOutcome:
    config = {"job": job, "outcome_path": str(storage / "outcome.json")}
    run_on_workers(_worker_loop, config, layout, storage, job.stage.name)
    return TrainOutcome(**json.loads((storage / "outcome.json").read_text()))


def run_on_workers(
    loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    layout: DataParallel,
    storage: Path,
    name: str,
) -> None:
    """``loop(config)`` on ``layout.workers`` Ray Train workers (gloo, or NCCL on GPUs), packed on one
    node, with a bounded wait for their placement; failures come back as readable OperatorErrors."""
    # The Train V2 classes that ray.train / ray.train.torch export at runtime (typed as V1 for mypy).
    from ray.train.torch import TorchConfig
    from ray.train.v2.api.config import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    _check_capacity(layout)
    # Read by the Train controller (propagated to it from here): bounded wait for the placement group.
    os.environ[_START_TIMEOUT_ENV] = f"{layout.start_timeout_s:g}"
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if layout.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=layout.workers,
            use_gpu=layout.gpu,
            resources_per_worker=layout.resources_per_worker(),
            placement_strategy="STRICT_PACK",
        ),
        run_config=RunConfig(
            # A reused name would restore the old run (FACTS.md): always a fresh one.
            name=f"forgeline-{name}-{uuid.uuid4().hex[:12]}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
        ),
    )
    storage.mkdir(parents=True, exist_ok=True)
    try:
        trainer.fit()
    except Exception as e:
        raise _readable(e, layout) from e


def _readable(error: Exception, layout: DataParallel) -> Exception:
    """A placement timeout or a worker's OperatorError as a plain OperatorError; anything else as is."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
        return OperatorError(
            f"the {layout.workers} Ray Train workers ({layout.resources_per_worker()} each) were not placed "
            f"within {layout.start_timeout_s:g} s: the cluster is busy"
        )
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, OperatorError):
            return OperatorError(str(cause))
    return error
