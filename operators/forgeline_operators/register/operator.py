"""Register a checkpoint directory as an MLflow model version and point an alias at it.

Nothing is uploaded: the version's ``source`` is the directory's URI in the stage store, and its tags
carry the content digest and lineage (workflow, stage run, input digest), so a version can always be
traced back to the data and the run that produced it. The metrics of every upstream evaluate /
quantize / prune / distill stage are copied onto the version as ``forgeline.metric.<stage>.<name>``
tags: the promotion gates compare versions on them. For each upstream evaluate stage the version
also records where its per-row scores are (``forgeline.eval.<stage>.rows``, a file in the stage store)
and the digest of what was scored (``forgeline.eval.<stage>.set``), so a promotion can compare the
candidate with production on the same rows, with a paired interval.
"""

from __future__ import annotations

import json
from pathlib import Path

from forgeline.artifacts import StageRecord, dir_digest, read_manifest
from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline.tracking import TAG_EVAL_PREFIX, TAG_METRIC_PREFIX, Tracker, register_version


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    path = ctx.input_path(stage.model)
    if not path.is_dir():
        raise OperatorError(f"register: {stage.model} resolved to {path}, which is not a directory")
    manifest = read_manifest(path)
    digest = manifest.digest if manifest else dir_digest(path)
    if ctx.tracking_uri is None:
        raise OperatorError("register needs a tracking URI (the runtime provides one)")
    tracker = Tracker(ctx.tracking_uri)
    tags = {
        "forgeline.sha256": digest,
        "forgeline.workflow": ctx.workflow.name,
        "forgeline.stage_run_id": ctx.run_id or "",
        "forgeline.source_ref": stage.model,
        **_quality_tags(ctx),
        **_eval_row_tags(ctx),
        **stage.tags,
    }
    version = register_version(
        tracker,
        stage.registered_name,
        source=path.resolve().as_uri(),
        run_id=ctx.run_id,
        tags=tags,
        alias=stage.alias,
        description=f"Registered by workflow {ctx.workflow.name!r}, stage {stage.name!r}",
    )
    ctx.logger.info(
        "registered %s version %s (alias %s) -> %s", version.name, version.version, stage.alias, path
    )
    ctx.set_tags(
        {"forgeline.registered_model": version.name, "forgeline.registered_version": str(version.version)}
    )
    return StageResult(
        outputs={"version": version.version, "model_uri": f"models:/{version.name}/{version.version}"},
        metrics={"registered_version": float(version.version)},
    )


# Stage kinds whose metrics describe the registered model's quality; promotion gates read them from the
# version (``forgeline.metric.<stage>.<metric>``), so a version carries its evidence with it.
_QUALITY_KINDS = ("evaluate", "quantize", "prune", "distill")


def _quality_tags(ctx: StageContext) -> dict[str, str]:
    tags: dict[str, str] = {}
    for name, metrics in sorted(ctx.upstream_metrics.items()):
        if ctx.workflow.stage(name).kind not in _QUALITY_KINDS:
            continue
        for metric, value in sorted(metrics.items()):
            tags[f"{TAG_METRIC_PREFIX}{name}.{metric}"] = repr(float(value))
    return tags


def _eval_row_tags(ctx: StageContext) -> dict[str, str]:
    tags: dict[str, str] = {}
    for name in sorted(ctx.upstream_metrics):
        if ctx.workflow.stage(name).kind != "evaluate":
            continue
        try:
            report = ctx.input_path(f"${{stages.{name}.outputs.report}}")
            eval_set = json.loads((report / "metrics.json").read_text()).get("eval_set_sha256")
        except (OperatorError, OSError, ValueError):
            continue  # a report without per-row scores: promotion compares its point values
        samples = report / "samples.jsonl"
        if eval_set and samples.is_file():
            tags[f"{TAG_EVAL_PREFIX}{name}.rows"] = samples.resolve().as_uri()
            tags[f"{TAG_EVAL_PREFIX}{name}.set"] = str(eval_set)
    return tags


def cache_check(record: StageRecord, home: Path, tracking_uri: str) -> str | None:
    """A cached registration is valid only while its model version still exists, unchanged."""
    from mlflow.exceptions import MlflowException

    from forgeline.tracking import get_version

    version = record.outputs.get("version", {}).get("value")
    model_uri = str(record.outputs.get("model_uri", {}).get("value", ""))
    name = model_uri.removeprefix("models:/").rsplit("/", 1)[0]
    if not name or version is None:
        return "the cached result names no model version"
    try:
        mv = get_version(Tracker(tracking_uri), name, int(version))
    except MlflowException:
        return f"model version {name}/{version} no longer exists in {tracking_uri}"
    if record.metrics.get("registered_version") != float(mv.version):
        return f"model version {name}/{version} differs from the cached registration"
    return None
