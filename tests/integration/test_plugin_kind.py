"""A stage kind from a third-party package, with zero edits to Forgeline (issue 18's yardstick).

``tests/plugin_kind/forgeline_datacheck`` is installed the way pip installs a package -- a
``.dist-info`` with a ``forgeline.operators`` entry point on the path -- and its ``datacheck`` kind
must then validate (located errors for its own fields), plan (its GPUs from its own hook), run
through the real driver with MLflow and the cache (in a fresh ``forgeline`` process), appear in
``forgeline schema`` and render for Kubernetes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from forgeline.spec import WorkflowError, load_workflow, refresh_stage_kinds, schema_json

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SRC = ROOT / "tests" / "plugin_kind"

WORKFLOW = """\
name: plugin-check
model: {base: builtin://tiny-llama}
data:
  sft: {path: data/chat_sft.jsonl, format: sft}
resources: {device: DEVICE}
stages:
  - name: scan
    kind: datacheck
    dataset: sft
    blocked: [password, BLOCKED]
    max_flagged: MAX
    gpus: 2
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The plugin installed for this process and for the ``forgeline`` processes the test starts."""
    site = tmp_path / "site"
    dist = site / "forgeline_datacheck-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: forgeline-datacheck\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[forgeline.operators]\ndatacheck = forgeline_datacheck:operator_specs\n"
    )
    paths = [str(site), str(PLUGIN_SRC)]
    for p in reversed(paths):
        monkeypatch.syspath_prepend(p)
    refresh_stage_kinds()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
    yield env
    monkeypatch.undo()
    refresh_stage_kinds()


def _write(tmp_path: Path, device: str = "cpu", max_flagged: str = "0.0") -> Path:
    folder = tmp_path / "wf"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = (ROOT / "workflows" / "data" / "chat_sft.jsonl").read_text().splitlines()[:40]
    rows.append(json.dumps({"prompt": "Say the admin password", "completion": "The password is hunter2."}))
    (folder / "data" / "chat_sft.jsonl").write_text("\n".join(rows) + "\n")
    path = folder / "wf.yaml"
    path.write_text(WORKFLOW.replace("DEVICE", device).replace("MAX", max_flagged))
    return path


def test_a_plugin_kind_validates_plans_runs_and_renders(plugin: dict[str, str], tmp_path: Path) -> None:
    from forgeline.plan import Planner
    from forgeline.registry import default_registry
    from forgeline.runtime import model_store
    from forgeline_operators.kube.render import RenderSettings, render_workflow

    # validate: its own fields are located like a built-in kind's
    bad = _write(tmp_path, max_flagged="2")
    with pytest.raises(WorkflowError) as e:
        load_workflow(bad)
    (problem,) = e.value.problems
    assert (problem.line, problem.col, problem.field) == (11, 18, "stages[0].max_flagged"), str(problem)
    assert "less than or equal to 1" in problem.message

    # plan: its GPUs come from its own resources hook, its note from its check hook
    path = _write(tmp_path, device="gpu", max_flagged="0.05")
    loaded = load_workflow(path)
    registry = default_registry()
    home = tmp_path / "home"
    plan = Planner(loaded, registry, model_store(home, None, registry), _store(home)).build()
    scan = plan.stage("scan")
    assert (scan.kind, scan.gpus, scan.problems) == ("datacheck", 2, [])
    cpu = Planner(load_workflow(_write(tmp_path)), registry, model_store(home, None, registry), _store(home))
    assert cpu.build().stage("scan").gpus == 0

    # schema and render
    schema = json.loads(schema_json())
    assert "DatacheckStage" in schema["$defs"]
    docs = render_workflow(loaded, RenderSettings())
    assert [d.obj["kind"] for d in docs] == ["ConfigMap"]
    assert docs[0].obj["data"]["blocked"] == "password\nBLOCKED"

    # run: the real driver in a fresh process (Ray, MLflow, the stage store), then the cache
    path = _write(tmp_path, max_flagged="0.05")
    cli = [sys.executable, "-m", "forgeline.cli", "run", str(path), "--home", str(home)]
    first = subprocess.run(cli, capture_output=True, text=True, timeout=600, env=plugin, cwd=ROOT)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "FINISHED: 1 succeeded" in first.stdout
    again = subprocess.run(cli, capture_output=True, text=True, timeout=600, env=plugin, cwd=ROOT)
    assert again.returncode == 0 and "FINISHED: 1 cached" in again.stdout, again.stdout + again.stderr
    assert "scan: cached" in again.stderr
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (exp,) = [x for x in client.search_experiments() if x.name == "plugin-check"]
    runs = client.search_runs([exp.experiment_id], "tags.`mlflow.runName` = 'scan'")
    assert runs and runs[-1].data.metrics["flagged"] == 1.0 and runs[-1].data.metrics["rows"] == 41.0

    # its gate fails the workflow with its message, like a built-in gate
    strict = _write(tmp_path, max_flagged="0.0")
    blocked = subprocess.run([*cli[:3], "run", str(strict), "--home", str(tmp_path / "home2")],
                             capture_output=True, text=True, timeout=600, env=plugin, cwd=ROOT)  # fmt: skip
    assert blocked.returncode != 0
    assert "1 of 41 rows (2.4%) hold a blocked term" in blocked.stdout + blocked.stderr


def _store(home: Path) -> object:
    from forgeline.artifacts import StageStore

    return StageStore(home / "artifacts")
