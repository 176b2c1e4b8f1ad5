"""Tracking through a real ``mlflow server`` (HTTP) instead of the embedded SQLite file: the layout a
team uses (one server, Postgres/MySQL behind it, artifacts proxied to object storage). Here the server's
backend is SQLite and its artifact destination a local folder -- the client side, which is Forgeline's
part, is the same HTTP API either way. The workflow runs on real Ray: workers log to the server, the
register operator creates a model version by reference, and ``status`` reads it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import opkit
from forgeline.cli import app
from forgeline.registry import default_registry
from forgeline.runtime import RunSettings, make_planner, run_workflow
from forgeline.spec import load_workflow
from forgeline.tracking import TAG_STAGE, Tracker
from forgeline_operators.ports import free_port
from processes import kill_session, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

WORKFLOW = """\
name: via-server
model: {base: builtin://tiny-llama}
data:
  d: {path: d.jsonl, format: text}
stages:
  - {name: a, kind: evaluate, dataset: d, max_samples: 2}
  - {name: reg, kind: register, model: "${stages.a.outputs.report}", registered_name: via-server-model}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{d / 'server.db'}",
            "--artifacts-destination",
            str(d / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        wait_for(healthy, "mlflow server /health", deadline_s=180, proc=proc)
        yield url
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)


def test_workflow_tracks_through_a_tracking_server(
    tmp_path: Path, home: Path, server: str, ray_session: None
) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW)
    settings = RunSettings(home=home, tracking_uri=server)
    registry = opkit.registry()  # evaluate -> the recording test operator; register is the real one
    real_register = default_registry().operator("register")
    assert real_register is not None
    registry.add_operator(real_register)
    summary = run_workflow(load_workflow(wf), settings, registry=registry)
    assert summary.state == "FINISHED" and summary.tracking_uri == server

    tracker = Tracker(server)
    parent = tracker.get_run(summary.run_id)
    assert parent.info.status == "FINISHED"
    # The experiment's artifacts live where the server says, not under this machine's home.
    exp = tracker.client.get_experiment(parent.info.experiment_id)
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    children = {
        c.data.tags[TAG_STAGE]: c for c in tracker.child_runs(parent.info.experiment_id, summary.run_id)
    }
    assert set(children) == {"a", "reg"}
    assert children["a"].data.metrics["perplexity"] == 2.0
    # Run artifacts went through the server's artifact proxy.
    local = tracker.client.download_artifacts(summary.run_id, "workflow.yaml", str(tmp_path / "dl"))
    assert Path(local).read_text() == WORKFLOW
    # Registered by reference: the version's source is the stage-store directory, with its digest.
    versions = tracker.client.search_model_versions("name='via-server-model'")
    assert len(versions) == 1
    mv = versions[0]
    report = summary.stages["a"].record.output_path("report")  # type: ignore[union-attr]
    assert mv.tags["forgeline.uri"] == report.resolve().as_uri()
    # The server refuses local paths as sources: the version points at a pointer artifact of the run.
    assert mv.source.startswith(("runs:/", "mlflow-artifacts:")), mv.source
    pointer = tracker.client.download_artifacts(
        children["reg"].info.run_id, "forgeline-ref", str(tmp_path / "p")
    )
    assert json.loads((Path(pointer) / "ref.json").read_text())["uri"] == report.resolve().as_uri()
    # ... and mlflow:// model URIs resolve to the real directory through the tag.
    planner = make_planner(load_workflow(wf), home, tracking_uri=server)
    resolved = planner.models.materialize("mlflow://models/via-server-model@candidate", tmp_path)
    assert resolved == report.resolve()
    assert mv.tags["forgeline.sha256"] == summary.stages["a"].record.output_digest("report")  # type: ignore[union-attr]
    assert tracker.client.get_model_version_by_alias("via-server-model", "candidate").version == mv.version

    # The CLI finds the run through MLFLOW_TRACKING_URI.
    shown = CliRunner().invoke(
        app, ["status", summary.run_id, "--home", str(home)], env={"MLFLOW_TRACKING_URI": server}
    )
    assert shown.exit_code == 0, shown.output
    assert "FINISHED" in shown.output and "reg" in shown.output
