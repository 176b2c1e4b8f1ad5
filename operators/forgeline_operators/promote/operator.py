"""``run(ctx)`` of the promote stage: :func:`.service.promote` with the stage's gates and endpoint.

The version is the stage's ``version`` ref (usually ``${stages.register.outputs.version}``) or the
``from_alias`` version; a ``candidate_endpoint`` ref (usually the deploy stage's URL) is what the SLO
gate benchmarks. A blocked gate fails the stage with the numbers (``forgeline resume`` retries it,
e.g. after ``forgeline approve``). A cached promotion is an event that happened: rerunning the
workflow does not repeat it, and it does not undo a later rollback. The one exception
(:func:`cache_check`): when the alias still names the promoted version but its local production
endpoint is no longer running (stopped, or the machine restarted), the stage runs again, which
gates the version against itself and brings the endpoint back, as a user rerunning the workflow
expects.
"""

from __future__ import annotations

import os
from pathlib import Path

from forgeline.artifacts import StageRecord
from forgeline.runtime.context import GateFailed, OperatorError, StageContext, StageResult
from forgeline.tracking import default_home
from forgeline_operators.promote import service

__all__ = ["cache_check", "run"]


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    if ctx.tracking_uri is None:
        raise OperatorError("promote needs a tracking URI (the runtime provides one)")
    endpoint = stage.endpoint
    if endpoint is not None and endpoint.target is None:  # the workflow's target decides
        endpoint = endpoint.model_copy(update={"target": ctx.workflow.target})
    version = int(ctx.values(stage.version)) if stage.version is not None else None
    candidate = str(ctx.values(stage.candidate_endpoint)) if stage.candidate_endpoint else None
    actor = os.environ.get("FORGELINE_SUBMITTER") or None
    try:
        record = service.promote(
            ctx.home or default_home(),
            ctx.tracking_uri,
            stage.registered_name,
            version=version,
            from_alias=stage.from_alias,
            to_alias=stage.to_alias,
            gates=stage.gates,
            endpoint=endpoint,
            candidate_endpoint=candidate,
            actor=actor,
            threads=ctx.threads,
        )
    except service.GateFailed as e:
        numbers = {
            f"{gate['name']}.{k}".replace(":", "."): float(v)
            for gate in (e.record.gates if e.record else [])
            for k, v in gate.get("inputs", {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        raise GateFailed(str(e), numbers) from None
    except service.PromotionError as e:
        raise OperatorError(str(e)) from None
    ctx.logger.info("%s", record.message)
    for gate in record.gates:
        ctx.logger.info(
            "gate %s: %s — %s", gate["name"], "pass" if gate["passed"] else "FAIL", gate["message"]
        )
    tags = {"forgeline.promotion.run_id": record.run_id or "", "forgeline.promotion.outcome": record.outcome}
    if record.endpoint and record.endpoint.get("url"):
        tags["forgeline.endpoint.url"] = str(record.endpoint["url"])
        ctx.logger.info("production endpoint %s serves version %s", record.endpoint["url"], record.version)
    ctx.set_tags(tags)
    metrics = {"promoted_version": float(record.version or 0), "promotion_seconds": record.duration_s}
    url = str((record.endpoint or {}).get("url") or "")
    return StageResult(outputs={"version": int(record.version or 0), "endpoint": url}, metrics=metrics)


def cache_check(record: StageRecord, home: Path, tracking_uri: str) -> str | None:
    """Stale only when the alias still names the cached promotion's version and its local endpoint
    is gone; a later promotion or rollback (the alias moved) keeps the record, so it is never undone."""
    from mlflow.exceptions import MlflowException

    from forgeline.tracking import Tracker, alias_version
    from forgeline_operators.deploy.endpoint import list_endpoints

    url = str(record.outputs.get("endpoint", {}).get("value") or "")
    version = record.outputs.get("version", {}).get("value")
    run_id = record.meta.get("run_id")
    if not url or not version or not run_id or ".svc.cluster.local" in url:
        return None  # no local endpoint to bring back (the cluster's controller keeps its own)
    if any(rec.url == url for rec in list_endpoints(home)):
        return None
    try:
        tracker = Tracker(tracking_uri)
        params = tracker.get_run(str(run_id)).data.params
        name, alias = params["registered_name"], params.get("to_alias", "production")
        current = alias_version(tracker, name, alias)
    except (MlflowException, KeyError):
        return None  # cannot tell: an event that happened is not repeated on a guess
    if current != int(version):
        return None
    return f"{name}@{alias} is still version {version}, but its endpoint {url} is no longer running"
