"""``run(ctx)`` of the plugin's ``datacheck`` kind: the rows holding a blocked term (whole words,
case-insensitive), their share as metrics, a report, and a gate on ``max_flagged``."""

from __future__ import annotations

import json
import re

from forgeline.sdk import GateFailed, OperatorError, StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    rows = ctx.read_rows(stage.dataset)
    if not rows:
        raise OperatorError(f"dataset {stage.dataset!r} is empty")
    flagged: list[int] = []
    if stage.blocked:
        terms = "|".join(re.escape(t) for t in stage.blocked)
        pattern = re.compile(rf"(?<!\w)({terms})(?!\w)", re.IGNORECASE)
        flagged = [i for i, row in enumerate(rows) if pattern.search(json.dumps(row, ensure_ascii=False))]
    share = len(flagged) / len(rows)
    metrics = {"rows": float(len(rows)), "flagged": float(len(flagged)), "flagged_share": share}
    ctx.log_metrics(metrics)
    report = ctx.output_dir / "report"
    report.mkdir(parents=True)
    (report / "flagged.json").write_text(json.dumps({"rows": flagged, "blocked": stage.blocked}) + "\n")
    if share > stage.max_flagged:
        raise GateFailed(
            f"{len(flagged)} of {len(rows)} rows ({share:.1%}) hold a blocked term, more than "
            f"max_flagged={stage.max_flagged:.1%}: rows {flagged[:10]}",
            metrics,
        )
    return StageResult(outputs={"report": report}, metrics=metrics)
