"""Register a checkpoint directory as an MLflow model version and point an alias at it.

Nothing is uploaded: the version's ``source`` is the directory's URI in the stage store, and its tags
carry the content digest and lineage (workflow, stage run, input digest), so a version can always be
traced back to the data and the run that produced it.
"""

from __future__ import annotations

from forgeline.artifacts import dir_digest, read_manifest
from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline.tracking import Tracker, register_version


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
