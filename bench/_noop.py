"""A do-nothing operator for measuring orchestration overhead (imported by Ray workers)."""

from __future__ import annotations

from forgeline.runtime.context import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    return StageResult(metrics={"noop": 1.0})
