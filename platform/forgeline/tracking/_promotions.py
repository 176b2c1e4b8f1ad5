"""Promotion records: one MLflow run per promotion attempt (or rollback) in the experiment
``forgeline-promotions``, so the history is visible in the MLflow UI next to the workflow runs.

A record is a plain JSON document (model, version, aliases, actor, gate results, outcome, timings); the
run carries it as the artifact ``promotion.json`` and its searchable fields as ``forgeline.promotion.*``
tags, gate numbers as metrics. ``history`` reads the tags back, newest first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from forgeline.tracking._runs import Tracker

PROMOTIONS_EXPERIMENT = "forgeline-promotions"
_PREFIX = "forgeline.promotion."
_RECORD_TAG = _PREFIX + "record"
_MAX_TAG = 7000  # SQLite/MySQL stores take 8000 characters per tag value


def _experiment_id(tracker: Tracker, artifact_root: Path) -> str:
    from forgeline.tracking._store import TrackingSettings, prepare

    # A local store keeps the records' artifacts under the home (never ./mlruns of the caller's cwd).
    return prepare(TrackingSettings(tracker.uri, PROMOTIONS_EXPERIMENT, artifact_root))


def log_promotion(
    tracker: Tracker, record: Mapping[str, Any], metrics: Mapping[str, float], artifact_root: Path
) -> str:
    """Write one promotion record as a finished run; returns the run id.

    ``artifact_root``: where a local store keeps run artifacts (``<home>/artifacts/mlflow``).
    """
    exp = _experiment_id(tracker, artifact_root)
    model, version = record["model"], record.get("version")
    tags = {
        _PREFIX + "model": str(model),
        _PREFIX + "version": str(version),
        _PREFIX + "action": str(record.get("action", "promote")),
        _PREFIX + "outcome": str(record["outcome"]),
        _PREFIX + "actor": str(record.get("actor", "")),
        _PREFIX + "to_alias": str(record.get("to_alias", "")),
        _PREFIX + "previous_version": str(record.get("previous_version") or ""),
    }
    text = json.dumps(record, sort_keys=True, default=str)
    if len(text) <= _MAX_TAG:
        tags[_RECORD_TAG] = text
    run_name = f"{record.get('action', 'promote')} {model} v{version}"
    run = tracker.client.create_run(exp, tags={"mlflow.runName": run_name, **tags}, run_name=run_name)
    run_id = str(run.info.run_id)
    tracker.log_metrics(run_id, metrics)
    tracker.log_json(run_id, record, "promotion.json")
    status = "FINISHED" if record["outcome"] in ("promoted", "rolled_back") else "FAILED"
    tracker.end_run(run_id, status)
    return run_id


def promotion_history(tracker: Tracker, model: str, max_results: int = 200) -> list[dict[str, Any]]:
    """Promotion records of ``model``, newest first."""
    exp = tracker.client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    if exp is None:
        return []
    quoted = model.replace("'", "\\'")
    runs = tracker.client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{_PREFIX}model` = '{quoted}'",
        max_results=max_results,
        order_by=["attributes.start_time DESC"],
    )
    out: list[dict[str, Any]] = []
    for run in runs:
        text = run.data.tags.get(_RECORD_TAG)
        if text:
            record: dict[str, Any] = json.loads(text)
        else:
            record = {k[len(_PREFIX) :]: v for k, v in run.data.tags.items() if k.startswith(_PREFIX)}
        record["run_id"] = run.info.run_id
        out.append(record)
    return out
