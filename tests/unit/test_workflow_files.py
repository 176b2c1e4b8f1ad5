"""Every shipped workflow is a test case: it loads, and it plans with the installed operators.

The only plan problem allowed is "operator not installed" for a stage kind whose operator has not
landed yet; anything else (a capability mismatch, a model that does not fit, a bad URI) fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeline.artifacts import ModelStore, StageStore
from forgeline.plan import Planner
from forgeline.registry import default_registry
from forgeline.spec import load_workflow

ROOT = Path(__file__).resolve().parents[2]
# workflows/lm_eval holds lm-evaluation-harness task files, not workflows.
WORKFLOWS = sorted(p for p in (ROOT / "workflows").rglob("*.yaml") if "lm_eval" not in p.parent.parts)


def test_there_are_shipped_workflows() -> None:
    assert WORKFLOWS, "no workflows/**/*.yaml found"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.relative_to(ROOT / "workflows").as_posix())
def test_shipped_workflow_loads_and_plans(path: Path, tmp_path: Path) -> None:
    loaded = load_workflow(path)
    registry = default_registry()
    installed = {op.kind for op in registry.operators()}
    plan = Planner(loaded, registry, ModelStore(tmp_path, registry), StageStore(tmp_path)).build()

    order = [s.name for s in plan.stages]
    assert sorted(order) == sorted(s.name for s in loaded.workflow.stages)
    for sp in plan.stages:
        assert all(order.index(d) < order.index(sp.name) for d in sp.deps), sp.name
    unexpected = []
    for sp in plan.stages:
        for p in sp.problems:
            pending = sp.kind not in installed and p.message.startswith("operator not installed")
            if not pending:
                unexpected.append(str(p))
    assert unexpected == []
    assert not list(tmp_path.rglob("mlflow.db")), "planning must not create a tracking store"
