"""What runs inside the Ray task of a stage: build the context, call the operator, publish outputs.

The worker resolves references (upstream outputs from the stage store, models through the model
store), binds metrics to the stage's MLflow child run, runs the operator into a staging directory and
publishes it atomically under the stage's cache key. It returns a plain dict (never raises), so the
driver gets operator errors and gate failures as clean messages rather than wrapped Ray exceptions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from forgeline.artifacts import ModelStore, StageRecord, StageStore
from forgeline.registry import OperatorRegistry, OperatorSpec, default_registry
from forgeline.runtime._model_store import model_store
from forgeline.runtime.context import DatasetInput, GateFailed, OperatorError, StageContext, StageResult
from forgeline.spec import LoadedWorkflow, parse_ref
from forgeline.tracking import RunSink, Tracker, TrackingSettings


@dataclass
class StageTask:
    """Everything a worker needs, pickled by Ray."""

    loaded: LoadedWorkflow
    stage_name: str
    key: str
    components: dict[str, str]
    operator: OperatorSpec
    records: dict[str, StageRecord]  # finished upstream stages by name
    dataset_sha: dict[str, str]
    home: Path
    tracking: TrackingSettings
    run_id: str
    log_path: Path
    threads: int
    registry: OperatorRegistry | None = None  # None: the worker's default (entry points)
    replace: bool = False  # --from: this result replaces a published one with the same key


def _resolver(task: StageTask, models: ModelStore) -> tuple[Callable[[str], Path], Callable[[str], Any]]:
    wf = task.loaded.workflow

    def resolve(ref: str) -> Path:
        parsed = parse_ref(ref)
        if parsed is None:
            return models.materialize(ref, task.loaded.base_dir)
        if parsed[0] == "model":
            return models.materialize(wf.model.base, task.loaded.base_dir)
        stage, output = parsed
        rec = task.records.get(stage)
        path = rec.output_path(output or "") if rec else None
        if path is None:
            raise OperatorError(f"{ref}: stage {stage!r} has no directory output {output!r}")
        return path

    def values(ref: str) -> Any:
        parsed = parse_ref(ref)
        if parsed is None or parsed[0] == "model":
            return None
        rec = task.records.get(parsed[0])
        out = rec.outputs.get(parsed[1] or "") if rec else None
        return out.get("value") if out else None

    return resolve, values


def execute(task: StageTask) -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = str(task.threads)
    started = time.time()
    task.log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(task.log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logger = logging.getLogger(f"forgeline.stage.{task.stage_name}")
    registry = task.registry or default_registry()
    store = StageStore(task.home / "artifacts")
    models = model_store(task.home, task.tracking.uri, registry)
    staging = store.staging(task.key)
    work = Path(tempfile.mkdtemp(prefix=f"forgeline-{task.stage_name}-"))
    tracker = Tracker(task.tracking.uri)
    sink = RunSink(tracker, task.run_id)
    resolve, values = _resolver(task, models)
    wf = task.loaded.workflow
    datasets = {
        name: DatasetInput(
            name, task.loaded.dataset_path(name), spec.format, task.dataset_sha[name], spec.rendering
        )
        for name, spec in wf.data.items()
    }
    ctx = StageContext(
        stage=wf.stage(task.stage_name),
        workflow=wf,
        output_dir=staging,
        work_dir=work,
        sink=sink,
        resolve=resolve,
        values=values,
        datasets=datasets,
        threads=task.threads,
        run_id=task.run_id,
        tracking_uri=task.tracking.uri,
        home=task.home,
        logger=logger,
        upstream_metrics={name: dict(rec.metrics) for name, rec in task.records.items()},
    )
    try:
        logger.info(
            "stage %s starting (key %s, operator %s)", task.stage_name, task.key, task.operator.entrypoint
        )
        # Libraries print progress (trl, tqdm): keep it in the stage log as well as Ray's worker log.
        with _tee_output(task.log_path):
            result = task.operator.load()(ctx)
        if not isinstance(result, StageResult):
            raise OperatorError(
                f"operator {task.operator.entrypoint} returned {type(result).__name__}, not StageResult"
            )
        dir_values = _place_outputs(result, staging, ctx.stage)
        record = store.publish(
            task.key,
            staging,
            values=dir_values,
            metrics=result.metrics,
            meta={
                "workflow": wf.name,
                "stage": task.stage_name,
                "kind": task.operator.kind,
                "operator_version": task.operator.version,
                "components": task.components,
                "run_id": task.run_id,
            },
            replace=task.replace,
        )
        logger.info("stage %s published %s in %.1fs", task.stage_name, record.path, time.time() - started)
        return {"ok": True, "record": record, "metrics": result.metrics, "seconds": time.time() - started}
    except BaseException as e:  # the driver decides; a worker never leaves a half-published result
        shutil.rmtree(staging, ignore_errors=True)
        tb = traceback.format_exc()
        logger.error("stage %s failed: %s\n%s", task.stage_name, e, tb)
        return {
            "ok": False,
            "error": str(e) or type(e).__name__,
            "error_type": type(e).__name__,
            "gate": isinstance(e, GateFailed),
            "user_error": isinstance(e, OperatorError),
            "metrics": getattr(e, "metrics", {}),
            "traceback": tb,
            "seconds": time.time() - started,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        root.removeHandler(handler)
        handler.close()


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def _tee_output(log_path: Path) -> Iterator[None]:
    with (
        open(log_path, "a", encoding="utf-8", buffering=1) as log,
        contextlib.redirect_stdout(_Tee(sys.stdout, log)),
        contextlib.redirect_stderr(_Tee(sys.stderr, log)),
    ):
        yield


def _place_outputs(result: StageResult, staging: Path, stage: Any) -> dict[str, Any]:
    """Directory outputs must end up at staging/<name>; returns the plain-value outputs."""
    declared = set(type(stage).outputs)
    values: dict[str, Any] = {}
    for name, value in result.outputs.items():
        if name not in declared:
            raise OperatorError(
                f"operator returned undeclared output {name!r} (declared: {sorted(declared)})"
            )
        if isinstance(value, Path):
            target = staging / name
            src = value.resolve()
            if src != target.resolve():
                if staging.resolve() not in src.parents:
                    raise OperatorError(f"output {name!r} at {src} is not under the stage's output_dir")
                src.rename(target)
            if not target.is_dir():
                raise OperatorError(f"output {name!r} must be a directory")
        else:
            values[name] = value
    stray = [p.name for p in staging.iterdir() if p.name not in result.outputs]
    if stray:
        raise OperatorError(f"operator left undeclared files in output_dir: {', '.join(sorted(stray))}")
    return values
