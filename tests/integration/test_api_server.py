"""The REST API end to end: a real ``forgeline api`` process, a workflow submitted over HTTP that a
detached ``forgeline run`` executes (real Ray, real MLflow), polled to FINISHED; its stages and log
read back; the submitter recorded; 401/403 on the real server; and no token anywhere in the store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from forgeline.api import create_token
from forgeline_operators.ports import free_port
from processes import terminate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = """\
name: api-smoke
model:
  base: builtin://tiny-llama
data:
  corpus: {path: data/corpus_sample.jsonl, format: text}
tracking: {experiment: api-smoke}
resources: {device: cpu, cpus_per_stage: 1}
stages:
  - name: eval
    kind: evaluate
    model: ${model}
    dataset: corpus
    max_samples: 8
"""

# A stage that runs far longer than the test: cancelled once it is running.
ENDLESS = """\
name: api-cancel
model:
  base: builtin://tiny-llama
data:
  chat: {path: data/chat_sft.jsonl, format: sft}
resources: {device: cpu, cpus_per_stage: 1}
stages:
  - name: train
    kind: finetune
    method: sft
    dataset: chat
    training: {max_steps: 100000, micro_batch_size: 2, max_seq_len: 32}
"""


def _wait(predicate: Callable[[], Any], deadline_s: float, what: str) -> Any:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[dict[str, Any]]:
    """A real `forgeline api` process on its own home, with a submit token and a read-only token."""
    home = tmp_path_factory.mktemp("api") / ".forgeline"
    home.mkdir()
    shutil.copy(mlflow_template, home / "mlflow.db")
    tokens = home / "api" / "tokens.json"
    submit = create_token(tokens, "ci-bot", ["read", "submit"])
    reader = create_token(tokens, "viewer", ["read"])
    port = free_port()
    cmd = [sys.executable, "-m", "forgeline.cli", "api", "--port", str(port), "--home", str(home)]
    cmd += ["--tokens", str(tokens), "--data-root", str(ROOT / "workflows")]
    log = open(home.parent / "api-server.log", "wb")  # noqa: SIM115  (closed after the module)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            assert proc.poll() is None, (home.parent / "api-server.log").read_text()
            return False

    try:
        _wait(healthy, 30, "the API server")
        print(f"api server up in {time.monotonic() - t0:.1f} s")
        with httpx.Client(base_url=base, timeout=90) as client:
            yield {"client": client, "home": home, "submit": submit, "reader": reader}
    finally:
        terminate(proc)
        log.close()


def _post(server: dict[str, Any], text: str, token: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/yaml"}
    return server["client"].post("/v1/workflows", content=text, headers=headers)  # type: ignore[no-any-return]


def test_submit_over_http_runs_to_finished(server: dict[str, Any]) -> None:
    c, home = server["client"], server["home"]
    auth = {"Authorization": f"Bearer {server['submit']}"}
    t0 = time.monotonic()
    assert c.get("/v1/runs").status_code == 401
    assert _post(server, WORKFLOW, server["reader"]).status_code == 403
    assert "openapi" in c.get("/openapi.json").json()

    r = _post(server, WORKFLOW, server["submit"])
    assert r.status_code == 202, r.text
    t_accepted = time.monotonic() - t0
    body = r.json()
    run_id = body["run_id"]
    assert run_id and r.headers["location"] == f"/v1/runs/{run_id}" and body["submitter"] == "ci-bot"

    def finished() -> dict[str, Any] | None:
        run: dict[str, Any] = c.get(f"/v1/runs/{run_id}", headers=auth).json()
        return run if run["status"] not in ("RUNNING", "SCHEDULED") else None

    run = _wait(finished, 50, "the run to end")
    assert run["status"] == "FINISHED", run
    assert run["submitter"] == "ci-bot" and run["workflow"] == "api-smoke"
    (stage,) = run["stages"]
    assert stage["name"] == "eval" and stage["state"] in ("succeeded", "cached")
    assert stage["metrics"]["perplexity"] > 1
    listed = c.get("/v1/runs?workflow=api-smoke", headers=auth).json()
    assert [x["run_id"] for x in listed] == [run_id]
    logs = c.get(f"/v1/runs/{run_id}/stages/eval/logs", headers=auth)
    if stage["state"] == "succeeded":
        assert logs.status_code == 200 and logs.text

    def driver_gone() -> bool:  # exits (and is reaped by the server) shortly after the run ends
        sub = c.get(f"/v1/submissions/{body['submission_id']}", headers=auth).json()
        assert sub["run_id"] == run_id
        return not sub["driver_running"]

    _wait(driver_gone, 20, "the driver to exit")
    total = time.monotonic() - t0
    print(f"api smoke: 202 with run id after {t_accepted:.1f} s, FINISHED + read back after {total:.1f} s")
    # No raw token anywhere Forgeline wrote: MLflow's store (params, tags), its artifacts, the submission.
    leaks = [
        str(path)
        for path in home.rglob("*")
        if path.is_file()
        and any(t.encode() in path.read_bytes() for t in (server["submit"], server["reader"]))
    ]
    assert leaks == []


def test_cancel_over_http_kills_the_detached_run(server: dict[str, Any]) -> None:
    c = server["client"]
    auth = {"Authorization": f"Bearer {server['submit']}"}
    r = _post(server, ENDLESS, server["submit"])
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]

    def stage_running() -> bool:
        run = c.get(f"/v1/runs/{run_id}", headers=auth).json()
        assert run["status"] == "RUNNING", run
        # As soon as the stage is marked running: the driver may still be starting Ray, the window where
        # a first SIGINT can be lost (the API's cancel then sends a second one).
        return bool(run["stages"][0]["state"] == "running")

    _wait(stage_running, 45, "the stage to start")
    t0 = time.monotonic()
    assert (
        c.post(
            f"/v1/runs/{run_id}/cancel", headers={"Authorization": f"Bearer {server['reader']}"}
        ).status_code
        == 403
    )
    r = c.post(f"/v1/runs/{run_id}/cancel", headers=auth)
    assert r.status_code == 200 and r.json()["cancelled"] is True, r.text
    print(f"api cancel: the call answered in {time.monotonic() - t0:.1f} s: {r.json()['message']}")

    def ended() -> dict[str, Any] | None:
        run: dict[str, Any] = c.get(f"/v1/runs/{run_id}", headers=auth).json()
        return run if run["status"] != "RUNNING" else None

    run = _wait(ended, 30, "the run to be KILLED")
    assert run["status"] == "KILLED" and run["state"] == "killed", run
    assert run["stages"][0]["state"] == "killed"
    print(f"api cancel: KILLED {time.monotonic() - t0:.1f} s after the cancel call")
