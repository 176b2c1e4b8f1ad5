"""Crash safety on real Ray + MLflow: ``kill -9`` of the driver mid-stage loses no finished stage and
``resume`` continues in the same MLflow run; Ctrl-C cancels the running task and marks runs KILLED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import opkit
from forgeline.artifacts import StageStore, pid_alive
from forgeline.runtime import RunSettings, run_workflow
from forgeline.spec import load_workflow
from forgeline.tracking import TAG_ROLE, TAG_STAGE, TAG_STATE
from processes import kill_session, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DRIVE = Path(__file__).with_name("drive.py")
KINDS = ["evaluate=echo", "finetune=slow"]
WORKFLOW = """\
name: crash
model: {base: builtin://tiny-llama}
data: {d: {path: d.jsonl, format: text}}
stages:
  - {name: a, kind: evaluate, dataset: d, max_samples: 1}
  - {name: s, kind: finetune, method: sft, dataset: d}
"""


def start_driver(tmp: Path, home: Path) -> subprocess.Popen[str]:
    (tmp / "d.jsonl").write_text('{"text": "hello world"}\n')
    (tmp / "wf.yaml").write_text(WORKFLOW)
    return subprocess.Popen(
        [sys.executable, str(DRIVE), str(tmp / "wf.yaml"), str(home), *KINDS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the test can clean up Ray's children
    )


def log_lines(tmp: Path) -> list[str]:
    log = tmp / "calls.log"
    return log.read_text().split() if log.exists() else []


def workflow_run(home: Path) -> object:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{TAG_ROLE}` = 'workflow'",
    )
    assert len(runs) == 1
    return runs[0]


def children(home: Path, run_id: str) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    return {r.data.tags[TAG_STAGE]: r for r in runs}


def interrupt_when_started(proc: subprocess.Popen[str], tmp: Path, sig: int) -> None:
    """Send ``sig`` to the driver once the slow stage runs; then clean up its whole session."""
    try:
        wait_for(lambda: "s:started" in log_lines(tmp), "stage s to start", proc=proc)
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        kill_session(proc.pid)
        if proc.poll() is None:
            proc.wait(timeout=30)


def test_kill9_mid_stage_then_resume(tmp_path: Path, home: Path, ray_session: None) -> None:
    proc = start_driver(tmp_path, home)
    interrupt_when_started(proc, tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert log_lines(tmp_path) == ["a", "s:started"]

    # Stage a was published atomically before the crash; nothing of s was.
    stages = StageStore(home / "artifacts").stages_dir
    published = [p for p in stages.iterdir() if not p.name.startswith(".") and p.name != "index"]
    assert len(published) == 1
    crashed = workflow_run(home)
    assert crashed.info.status == "RUNNING"  # type: ignore[attr-defined]
    run_id = crashed.info.run_id  # type: ignore[attr-defined]

    (tmp_path / "release").write_text("")
    (tmp_path / "calls.log").unlink()
    summary = run_workflow(
        load_workflow(tmp_path / "wf.yaml"),
        RunSettings(home=home),
        registry=opkit.registry(dict(k.split("=") for k in KINDS)),
        resume_run_id=run_id,
    )
    assert summary.run_id == run_id
    assert summary.stages["a"].state == "cached"
    assert summary.stages["s"].state == "succeeded"
    assert log_lines(tmp_path) == ["s:started", "s:finished"]  # a did not run again
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    kids = children(home, run_id)
    assert set(kids) == {"a", "s"}  # the same child runs, none duplicated
    assert all(k.info.status == "FINISHED" for k in kids.values())  # type: ignore[attr-defined]
    # Staging directories of the dead driver were cleaned up.
    assert not [p for p in stages.iterdir() if p.name.startswith(".staging-")]


def test_sigint_cancels_running_stage_and_marks_runs_killed(tmp_path: Path, home: Path) -> None:
    proc = start_driver(tmp_path, home)
    try:
        wait_for(lambda: (tmp_path / "slow.pid").exists(), "stage s to start", proc=proc)
        worker = int((tmp_path / "slow.pid").read_text())
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        assert proc.returncode == 130
        # The driver cancelled the task: the worker running the operator goes away by itself.
        wait_for(lambda: not pid_alive(worker), "the cancelled stage's worker to exit", deadline_s=30)
    finally:
        kill_session(proc.pid)
    assert "s:finished" not in log_lines(tmp_path)
    run = workflow_run(home)
    assert run.info.status == "KILLED"  # type: ignore[attr-defined]
    kids = children(home, run.info.run_id)  # type: ignore[attr-defined]
    assert kids["a"].info.status == "FINISHED"  # type: ignore[attr-defined]
    assert kids["s"].info.status == "KILLED"  # type: ignore[attr-defined]
    assert kids["s"].data.tags[TAG_STATE] == "killed"  # type: ignore[attr-defined]


def test_cli_cancel_stops_a_run_from_another_terminal(tmp_path: Path, home: Path) -> None:
    proc = start_driver(tmp_path, home)
    try:
        wait_for(lambda: "s:started" in log_lines(tmp_path), "stage s to start", proc=proc)
        run_id = workflow_run(home).info.run_id  # type: ignore[attr-defined]
        cancel = subprocess.run(
            [sys.executable, "-m", "forgeline.cli", "cancel", run_id, "--home", str(home)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        proc.wait(timeout=60)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 130
    assert workflow_run(home).info.status == "KILLED"  # type: ignore[attr-defined]
