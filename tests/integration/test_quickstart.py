"""The main job through the real CLI in fresh processes: real Ray, real MLflow, real operators.

`kill -9` of `forgeline run` after the first stage finished, then `forgeline resume RUN_ID` finishes
the same MLflow run without redoing that stage; a model version is registered with the candidate
alias; a plain rerun runs nothing; `forgeline serve` serves that version under each spelling of its
registry URI (`mlflow://models/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/NAME@ALIAS`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from forgeline.tracking import TAG_ROLE, TAG_STAGE
from forgeline_operators.ports import free_port
from processes import kill_session

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "forgeline.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def forgeline(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--home", str(home)], cwd=ROOT, capture_output=True, text=True, timeout=800, env=ENV
    )


@pytest.fixture
def stop_endpoints(home: Path) -> Iterator[None]:
    """The quickstart leaves its endpoint running (by design): stop it whatever the test did."""
    yield
    forgeline("endpoints", "stop", "--all", home=home)


def test_quickstart_kill9_resume_then_fully_cached(home: Path, stop_endpoints: None) -> None:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    proc = subprocess.Popen(
        [*CLI, "run", "workflows/quickstart-tiny.yaml", "--home", str(home)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    run_id = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run_id is None:
            assert proc.poll() is None, "forgeline run ended before the test could kill it"
            for r in client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string="attributes.status = 'FINISHED' and tags.`forgeline.role` = 'stage'",
            ):
                run_id = r.data.tags["mlflow.parentRunId"]
            time.sleep(0.3)
        assert run_id is not None, "no stage finished within 300 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_session(proc.pid)
    assert client.get_run(run_id).info.status == "RUNNING"  # the driver died without a word

    resumed = forgeline("resume", run_id, home=home)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert client.get_run(run_id).info.status == "FINISHED"
    exp = client.get_run(run_id).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    stages = sorted(c.data.tags[TAG_STAGE] for c in children)
    # one child run per stage, none duplicated
    assert stages == sorted(
        [
            "eval-base",
            "sft",
            "align",
            "eval-tuned",
            "quantize",
            "build",
            "register",
            "serve",
            "deploy",
            "promote",
        ]
    )
    assert all(c.info.status == "FINISHED" for c in children)
    workflow_runs = client.search_runs([exp], filter_string=f"tags.`{TAG_ROLE}` = 'workflow'")
    assert len(workflow_runs) == 1  # resume continued the same run

    # The endpoint the run deployed answers through its OpenAI-compatible API.
    body = {"model": "quickstart-tiny", "prompt": "Uppercase: hello", "max_tokens": 8}
    reply = httpx.post("http://127.0.0.1:8323/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1

    mv = client.get_model_version_by_alias("quickstart-tiny-llama", "candidate")
    assert mv.tags["forgeline.sha256"]
    assert Path(mv.source.removeprefix("file://")).is_dir()  # registered by reference, not uploaded

    again = forgeline("run", "workflows/quickstart-tiny.yaml", home=home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "10 cached" in again.stdout  # the endpoint is still up, so even deploy is reused
    assert len(client.search_model_versions("name = 'quickstart-tiny-llama'")) == 1

    status = forgeline("status", home=home)
    assert status.returncode == 0, status.stderr
    assert "cached" in status.stdout

    _serve_every_registry_spelling(home, "quickstart-tiny-llama", int(mv.version))


def _serve_every_registry_spelling(home: Path, model: str, version: int) -> None:
    """`forgeline serve` of the registered version under each URI spelling answers an OpenAI client.

    The repository is built once (the three URIs share one fingerprint); each endpoint is stopped before
    the next starts, so at most one extra tritonserver runs beside the quickstart's two."""
    from openai import OpenAI

    uris = {
        "by-mlflow-alias": f"mlflow://models/{model}@candidate",
        "by-models-version": f"models:/{model}/{version}",
        "by-models-alias": f"models:/{model}@candidate",
    }
    for name, uri in uris.items():
        port = free_port()
        served = forgeline("serve", uri, "--detach", "--name", name, "--port", str(port), home=home)
        try:
            assert served.returncode == 0, f"{uri}: {served.stdout}{served.stderr}"
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
            reply = client.completions.create(model=name, prompt="Uppercase: hello", max_tokens=4)
            assert reply.usage is not None and reply.usage.completion_tokens >= 1, uri
        finally:
            stopped = forgeline("endpoints", "stop", name, home=home)
        assert stopped.returncode == 0 and f"stopped {name}" in stopped.stdout, stopped.stderr
    assert len(list((home / "serving").iterdir())) == 1  # one repository for the one version
