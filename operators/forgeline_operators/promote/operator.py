"""``run(ctx)`` of the promote stage: :func:`.service.promote` with the stage's gates and endpoint.

The version is the stage's ``version`` ref (usually ``${stages.register.outputs.version}``) or the
``from_alias`` version; a ``candidate_endpoint`` ref (usually the deploy stage's URL) is what the SLO
gate benchmarks. A blocked gate fails the stage with the numbers (``forgeline resume`` retries it,
e.g. after ``forgeline approve``). A cached promotion is an event that happened: rerunning the
workflow does not repeat it, and it does not undo a later rollback.
"""

from __future__ import annotations

import os

from forgeline.runtime.context import GateFailed, OperatorError, StageContext, StageResult
from forgeline.tracking import default_home
from forgeline_operators.promote import service

__all__ = ["run"]


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
