"""Run-level CLI features on real Ray and MLflow: ``--only`` / ``--from`` (what runs, what is cached,
what is replaced, what ``resume`` reads back), ``status --watch`` and ``logs``. Operators are the
recording ones of ``tests/opkit.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import opkit
from forgeline.artifacts._manifest import MANIFEST_NAME
from forgeline.cli import app
from forgeline.plan import Selection, SelectionError
from forgeline.runtime import RunSettings, run_workflow
from forgeline.spec import load_workflow
from forgeline.tracking import Tracker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# a -> b -> d2 ; c is independent
WORKFLOW = """\
name: sel
model: {base: builtin://tiny-llama}
data:
  d: {path: d.jsonl, format: text}
stages:
  - {name: a, kind: evaluate, dataset: d, max_samples: 1}
  - {name: b, kind: evaluate, dataset: d, model: "${stages.a.outputs.report}", max_samples: 2}
  - {name: c, kind: evaluate, dataset: d, max_samples: 3, needs: []}
  - {name: d2, kind: evaluate, dataset: d, model: "${stages.b.outputs.report}", max_samples: 4}
"""


def _wf(tmp: Path) -> Path:
    (tmp / "d.jsonl").write_text('{"text": "hello world"}\n')
    wf = tmp / "wf.yaml"
    wf.write_text(WORKFLOW)
    return wf


def _calls(tmp: Path) -> list[str]:
    log = tmp / "calls.log"
    lines = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return sorted(lines)


def _run(wf: Path, home: Path, only: tuple[str, ...] = (), rerun_from: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    settings = RunSettings(home=home, selection=Selection(only, rerun_from))
    return run_workflow(load_workflow(wf), settings, registry=opkit.registry())


def test_selection_closures_and_unknown_names(tmp_path: Path) -> None:
    wf = load_workflow(_wf(tmp_path)).workflow
    assert Selection(("b",)).selected(wf) == {"a", "b"}
    assert Selection(("d2", "c")).selected(wf) == {"a", "b", "c", "d2"}
    assert Selection((), ("b",)).forced(wf) == {"b", "d2"}
    # --from is cut to what --only selects.
    assert Selection(("b",), ("a",)).forced(wf) == {"a", "b"}
    sel = Selection(("b", "c"), ("a",))
    assert Selection.from_tags(sel.to_tags()) == sel  # what resume reads back
    with pytest.raises(SelectionError, match=r"--only bb: no stage of that name .*did you mean 'b'\?"):
        Selection(("bb",)).check(wf)
    with pytest.raises(SelectionError, match=r"--from zzz: .*stages: a, b, c, d2"):
        Selection((), ("zzz",)).check(wf)


def test_only_runs_targets_and_their_needs(tmp_path: Path, home: Path, ray_session: None) -> None:
    wf = _wf(tmp_path)
    first = _run(wf, home, only=("b",))
    assert _calls(tmp_path) == ["a", "b"]
    assert set(first.stages) == {"a", "b"}
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}")
    parent = tracker.get_run(first.run_id)
    children = tracker.child_runs(parent.info.experiment_id, first.run_id)
    assert sorted(c.data.tags["forgeline.stage"] for c in children) == ["a", "b"]
    assert parent.data.tags["forgeline.select.only"] == "b"
    # status --watch on a finished run prints the table once and returns.
    shown = CliRunner().invoke(app, ["status", first.run_id, "--watch", "--home", str(home)])
    assert shown.exit_code == 0, shown.output
    assert "FINISHED" in shown.output and "perplexity=2" in shown.output
    # logs: a stage that ran has its log; a typo gets a suggestion; c never ran in this run.
    logged = CliRunner().invoke(app, ["logs", "b", "--run", first.run_id, "--home", str(home)])
    assert logged.exit_code == 0, logged.output
    assert "stage b published" in logged.output
    typo = CliRunner().invoke(app, ["logs", "bb", "--run", first.run_id, "--home", str(home)])
    assert typo.exit_code == 1 and "has no stage 'bb' (did you mean 'b'?)" in typo.output
    # The rest of the workflow later reuses what --only produced.
    _run(wf, home)
    assert _calls(tmp_path) == ["c", "d2"]


def test_from_reruns_downstream_and_replaces_results(tmp_path: Path, home: Path, ray_session: None) -> None:
    wf = _wf(tmp_path)
    first = _run(wf, home)
    assert _calls(tmp_path) == ["a", "b", "c", "d2"]
    old_b = first.stages["b"].record
    assert old_b is not None
    old_meta = json.loads((old_b.path / MANIFEST_NAME).read_text())["meta"]

    second = _run(wf, home, rerun_from=("b",))
    assert _calls(tmp_path) == ["b", "d2"]
    states = {n: o.state for n, o in second.stages.items()}
    assert states == {"a": "cached", "b": "succeeded", "c": "cached", "d2": "succeeded"}
    new_b = second.stages["b"].record
    assert new_b is not None and new_b.key == old_b.key  # same content key, fresh publication
    assert new_b.path == old_b.path and new_b.path.is_dir()
    new_meta = json.loads((new_b.path / MANIFEST_NAME).read_text())["meta"]
    assert new_meta["run_id"] == second.stages["b"].run_id != old_meta["run_id"]
    assert not list(new_b.path.parent.glob(".trash-*")), "the replaced publication was not cleaned up"
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}")
    b_run = tracker.get_run(second.stages["b"].run_id or "")
    assert b_run.data.tags["forgeline.rerun"] == "--from"

    # Without --from, everything is cached again (the replaced result is found by its key).
    third = _run(wf, home)
    assert _calls(tmp_path) == []
    assert {o.state for o in third.stages.values()} == {"cached"}
