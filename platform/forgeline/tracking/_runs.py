"""MLflow runs for workflows and stages: parent run, nested child runs, batched logging, lineage tags.

All writes go through ``log_batch`` (one round trip per call, ~30 ms on SQLite, instead of one per
metric). Big artifacts are never uploaded: they are recorded by reference (URI + sha256 tags).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

# Tag names: one place, so the CLI/API read what the runtime writes.
TAG_WORKFLOW = "forgeline.workflow"
TAG_ROLE = "forgeline.role"  # "workflow" | "stage"
TAG_STAGE = "forgeline.stage"
TAG_KIND = "forgeline.kind"
TAG_CACHE_KEY = "forgeline.cache_key"
TAG_CACHED = "forgeline.cached"
TAG_STATE = "forgeline.state"  # pending|running|succeeded|cached|failed|killed|skipped
TAG_ERROR = "forgeline.error"
TAG_OPERATOR_VERSION = "forgeline.operator_version"
TAG_DRIVER_PID = "forgeline.driver_pid"
TAG_DRIVER_HOST = "forgeline.driver_host"
TAG_WORKFLOW_FILE = "forgeline.workflow_file"
TAG_ORDER = "forgeline.order"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"

_MAX_BATCH = 100
_MAX_PARAM_LEN = 6000


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> ``a.b.c: value`` strings (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_MAX_PARAM_LEN]
    return out


class Tracker:
    """A thin, typed facade over MlflowClient for Forgeline's runs."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # ---------------------------------------------------------------- runs
    def start_run(
        self,
        experiment_id: str,
        name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> str:
        all_tags = {RUN_NAME_TAG: name, **tags}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=name)
        return str(run.info.run_id)

    def end_run(self, run_id: str, status: str) -> None:
        """status: FINISHED | FAILED | KILLED."""
        self.client.set_terminated(run_id, status=status, end_time=int(time.time() * 1000))

    def reopen_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), _MAX_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _MAX_BATCH], synchronous=True)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self.log_all(run_id, params=params)

    def log_all(
        self,
        run_id: str,
        metrics: Mapping[str, float] | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        step: int | None = None,
    ) -> None:
        """Metrics, params (flattened) and tags in as few ``log_batch`` round trips as possible.

        Re-logging a param with the same value is allowed by MLflow, so resumed runs can log again.
        """
        ts = int(time.time() * 1000)
        items: list[Metric | Param | RunTag] = [
            Metric(k, float(v), ts, step or 0) for k, v in (metrics or {}).items()
        ]
        items += [Param(k, v) for k, v in flatten(params or {}).items()]
        items += [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
        for i in range(0, len(items), _MAX_BATCH):
            chunk = items[i : i + _MAX_BATCH]
            self.client.log_batch(
                run_id,
                metrics=[x for x in chunk if isinstance(x, Metric)],
                params=[x for x in chunk if isinstance(x, Param)],
                tags=[x for x in chunk if isinstance(x, RunTag)],
                synchronous=True,
            )

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_BATCH):
            self.client.log_batch(run_id, tags=items[i : i + _MAX_BATCH], synchronous=True)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_table(self, run_id: str, columns: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """``columns`` as an MLflow table (``MlflowClient.log_table``: a JSON artifact the UI renders)."""
        self.client.log_table(
            run_id, data={k: list(v) for k, v in columns.items()}, artifact_file=artifact_file
        )

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_json(self, run_id: str, data: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / Path(artifact_file).name
            p.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(p), None if parent == "." else parent)

    # ------------------------------------------------------------- queries
    def get_run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    def child_runs(self, experiment_id: str, parent_run_id: str) -> list[Any]:
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000
        )
        return sorted(runs, key=lambda r: int(r.data.tags.get(TAG_ORDER, "0")))

    def workflow_runs(self, experiment_ids: list[str], max_results: int = 50) -> list[Any]:
        return list(
            self.client.search_runs(
                experiment_ids,
                filter_string=f"tags.`{TAG_ROLE}` = 'workflow'",
                max_results=max_results,
                order_by=["attributes.start_time DESC"],
            )
        )

    def experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]


class RunSink:
    """MetricSink bound to one MLflow run (what an operator's ``ctx.log_metrics`` writes to)."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.latest: dict[str, float] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.latest.update({k: float(v) for k, v in metrics.items()})
        self.tracker.log_metrics(self.run_id, metrics, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(self.run_id, params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def log_table(self, columns: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        self.tracker.log_table(self.run_id, columns, artifact_file)
