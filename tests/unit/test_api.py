"""The REST API with FastAPI's TestClient over a real MLflow SQLite store: auth (401/403), the error
shape, workflow validation with located problems, what a submission may touch (datasets, model paths,
YAML alias bombs, body size), submission -> run id discovery, runs, stages, logs and cancel."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from forgeline.api import ApiSettings, create_app, create_token, load_tokens, token_hash
from forgeline.tracking import (
    TAG_DRIVER_HOST,
    TAG_DRIVER_PID,
    TAG_KIND,
    TAG_ORDER,
    TAG_ROLE,
    TAG_STAGE,
    TAG_STATE,
    TAG_WORKFLOW,
    Tracker,
    TrackingSettings,
    prepare,
    resolve_settings,
)

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = """\
name: api-eval
model:
  base: builtin://tiny-llama
data:
  corpus: {path: data/corpus_sample.jsonl, format: text}
resources: {device: cpu, cpus_per_stage: 1}
stages:
  - name: eval
    kind: evaluate
    model: ${model}
    dataset: corpus
    max_samples: 4
"""


class FakeProc:
    """Stands in for the detached `forgeline run`: it opens the parent run the way the driver does."""

    def __init__(self, uri: str, submitter: str, create: bool = True) -> None:
        self.pid = os.getpid()
        self.exit: int | None = None if create else 1
        if create:
            tracker = Tracker(uri)
            exp = prepare(TrackingSettings(uri, "api-eval", Path(uri[len("sqlite:///") :]).parent / "a"))
            tracker.start_run(
                exp,
                "api-eval",
                {
                    TAG_ROLE: "workflow",
                    TAG_WORKFLOW: "api-eval",
                    TAG_DRIVER_PID: str(self.pid),
                    TAG_DRIVER_HOST: socket.gethostname(),
                    "forgeline.submitter": submitter,
                },
            )

    def poll(self) -> int | None:
        return self.exit


@pytest.fixture
def api(home: Path) -> dict[str, Any]:
    tokens = home / "api" / "tokens.json"
    raw = {
        "reader": create_token(tokens, "reader", ["read"]),
        "submitter": create_token(tokens, "sam", ["read", "submit"]),
        "promoter": create_token(tokens, "pat", ["read", "promote"]),
    }
    settings = ApiSettings(
        home=home,
        tracking_uri=resolve_settings(None, "", home).uri,
        data_root=ROOT / "workflows",
        tokens_file=tokens,
        max_body_bytes=64 * 1024,
        submit_wait_s=5.0,
        cancel_wait_s=1.0,
    )
    launched: list[Any] = []

    def launcher(s: ApiSettings, sub: Any) -> FakeProc:
        launched.append(sub)
        return FakeProc(s.tracking_uri, sub.submitter, create=sub.workflow != "no-run")

    client = TestClient(create_app(settings, launcher=launcher))
    return {"client": client, "tokens": raw, "settings": settings, "launched": launched}


def _h(api: dict[str, Any], who: str, ctype: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api['tokens'][who]}"}
    if ctype:
        headers["Content-Type"] = ctype
    return headers


def _submit(api: dict[str, Any], text: str, who: str = "submitter", query: str = "") -> Any:
    return api["client"].post(
        f"/v1/workflows{query}", content=text.encode(), headers=_h(api, who, "application/yaml")
    )


# --------------------------------------------------------------------------------------------- auth


def test_tokens_file_holds_only_hashes(api: dict[str, Any]) -> None:
    path = api["settings"].tokens_file
    text = path.read_text()
    for raw in api["tokens"].values():
        assert raw not in text
        assert token_hash(raw) in load_tokens(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_401_without_or_with_unknown_token_and_403_without_scope(api: dict[str, Any]) -> None:
    c = api["client"]
    r = c.get("/v1/runs")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "unauthenticated"
    r = c.get("/v1/runs", headers={"Authorization": "Bearer flt_not-a-token"})
    assert r.status_code == 401 and "invalid_token" in r.headers["www-authenticate"]
    r = _submit(api, WORKFLOW, who="reader")
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["code"] == "forbidden" and err["details"] == {"required_scope": "submit", "scopes": ["read"]}
    r = c.post("/v1/models/m/promote", json={}, headers=_h(api, "submitter"))
    assert r.status_code == 403 and "'promote' scope" in r.json()["error"]["message"]
    assert c.get("/v1/runs", headers=_h(api, "reader")).status_code == 200
    assert c.get("/v1/health").json() == {"status": "ok", "auth": True}


def test_new_token_works_without_restart(api: dict[str, Any]) -> None:
    raw = create_token(api["settings"].tokens_file, "late", ["read"])
    r = api["client"].get("/v1/models", headers={"Authorization": f"Bearer {raw}"})
    assert r.status_code == 200 and r.json() == []


def test_no_auth_mode_acts_as_the_local_user(api: dict[str, Any]) -> None:
    settings = api["settings"].model_copy(update={"tokens_file": None, "no_auth": True})
    client = TestClient(create_app(settings, launcher=lambda s, sub: FakeProc(s.tracking_uri, sub.submitter)))
    assert client.get("/v1/health").json()["auth"] is False
    r = client.post("/v1/workflows", content=WORKFLOW, headers={"Content-Type": "text/plain"})
    assert r.status_code == 202, r.text
    assert r.json()["submitter"].endswith("@local")


def test_app_refuses_to_start_without_tokens(home: Path) -> None:
    settings = ApiSettings(home=home, tracking_uri="sqlite:///x.db", data_root=home)
    with pytest.raises(ValueError, match="tokens file"):
        create_app(settings)


# ------------------------------------------------------------------------------------- validation


def test_invalid_workflow_lists_every_problem_with_positions(api: dict[str, Any]) -> None:
    bad = WORKFLOW.replace("max_samples: 4", "max_sampels: 4").replace("${model}", "${stages.nope.outputs.x}")
    r = _submit(api, bad)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_workflow"
    by_field = {p["field"]: p for p in err["details"]}
    typo = next(p for f, p in by_field.items() if f.endswith("max_sampels"))
    assert typo["file"] == "workflow.yaml" and typo["line"] == 12 and typo["col"] is not None
    assert typo["hint"] == "did you mean 'max_samples'?"
    assert any("nope" in p["message"] for p in err["details"])
    assert api["launched"] == []


def test_yaml_syntax_error_has_line_and_column(api: dict[str, Any]) -> None:
    r = _submit(api, "name: x\nstages: [\n")
    assert r.status_code == 422
    (p,) = r.json()["error"]["details"]
    assert p["message"].startswith("invalid YAML") and p["line"] == 3


def test_alias_bomb_is_refused_before_expansion(api: dict[str, Any]) -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        levels.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    r = _submit(api, "\n".join(levels) + "\n")
    assert r.status_code == 422
    assert "expands to more than" in r.json()["error"]["details"][0]["message"]
    r = _submit(api, "name: &n [1, *n]\n")
    assert r.status_code == 422 and "recursive YAML alias" in r.json()["error"]["message"]
    r = _submit(api, "name: " + "[" * 20000 + "]" * 20000 + "\n")
    assert r.status_code == 422 and "nests deeper than 64 levels" in r.json()["error"]["message"]


def test_python_tags_are_not_constructed(api: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = WORKFLOW.replace("name: api-eval", f"name: !!python/object/apply:os.system ['touch {marker}']")
    r = _submit(api, text)
    assert r.status_code == 422
    (p,) = r.json()["error"]["details"]
    assert p["message"] == "YAML tag !!python/object/apply:os.system is not allowed" and p["line"] == 1
    assert not marker.exists()
    r = _submit(api, WORKFLOW.replace("max_samples: 4", "max_samples: !custom 4"))
    assert r.status_code == 422 and "!custom" in r.json()["error"]["message"]
    assert _submit(
        api, WORKFLOW.replace("max_samples: 4", "max_samples: !!int 4"), query="?dry_run=1"
    ).is_success


def test_dataset_outside_data_root_is_refused_without_reading_it(api: dict[str, Any]) -> None:
    for path in ("../../../etc/passwd", "/etc/passwd"):
        r = _submit(api, WORKFLOW.replace("data/corpus_sample.jsonl", path))
        assert r.status_code == 422
        (p,) = r.json()["error"]["details"]
        assert p["field"] == "data.corpus.path" and p["line"] == 5 and "outside" in p["message"]
        assert "root:" not in r.text  # nothing of the file leaked


def test_model_paths_outside_artifact_root_are_refused(api: dict[str, Any]) -> None:
    root = api["settings"].artifact_root
    cases = {
        "/etc": "outside the artifact root",
        f"file://{root}/../../etc": "outside the artifact root",
        f"{root}/../secret": "outside the artifact root",
        "models/mine": "relative model path",
    }
    for uri, expected in cases.items():
        r = _submit(api, WORKFLOW.replace("builtin://tiny-llama", uri))
        assert r.status_code == 422, uri
        msgs = [p for p in r.json()["error"]["details"] if p["field"] == "model.base"]
        assert msgs and expected in msgs[0]["message"], (uri, r.json())


def test_foreign_tracking_uri_is_refused(api: dict[str, Any]) -> None:
    text = WORKFLOW.replace("resources:", "tracking: {uri: 'http://elsewhere:5000'}\nresources:")
    r = _submit(api, text)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "tracking.uri"


def test_body_limit_and_media_type(api: dict[str, Any]) -> None:
    big = WORKFLOW + "#" * (70 * 1024)
    r = _submit(api, big)
    assert r.status_code == 413 and r.json()["error"]["details"] == {"limit_bytes": 64 * 1024}

    def chunks() -> Any:  # no Content-Length: counted while streaming
        for _ in range(20):
            yield b"#" * 8192

    r = api["client"].post(
        "/v1/workflows", content=chunks(), headers=_h(api, "submitter", "application/yaml")
    )
    assert r.status_code == 413
    r = api["client"].post("/v1/workflows", json={"a": 1}, headers=_h(api, "submitter"))
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_dry_run_returns_the_plan_and_starts_nothing(api: dict[str, Any]) -> None:
    r = _submit(api, WORKFLOW, query="?dry_run=true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["workflow"] == "api-eval"
    assert [s["name"] for s in body["plan"]["stages"]] == ["eval"]
    assert api["launched"] == []


# ------------------------------------------------------------------------------ submission and runs


def test_submit_stores_yaml_and_returns_the_drivers_run(api: dict[str, Any]) -> None:
    r = _submit(api, WORKFLOW)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["submitter"] == "sam" and body["run_id"]
    assert r.headers["location"] == f"/v1/runs/{body['run_id']}"
    (sub,) = api["launched"]
    stored = sub.path.read_text()
    assert sub.path.parent == api["settings"].home / "api" / "submissions"
    # relative dataset paths were made absolute under the data root, so the run works from anywhere
    assert str(ROOT / "workflows" / "data" / "corpus_sample.jsonl") in stored
    run = api["client"].get(f"/v1/runs/{body['run_id']}", headers=_h(api, "reader")).json()
    assert run["submitter"] == "sam" and run["workflow"] == "api-eval"
    st = api["client"].get(f"/v1/submissions/{body['submission_id']}", headers=_h(api, "reader")).json()
    assert st["run_id"] == body["run_id"] and st["driver_running"] is True


def test_driver_that_exits_early_is_a_clear_error(api: dict[str, Any]) -> None:
    text = WORKFLOW.replace("name: api-eval", "name: no-run")
    r = _submit(api, text)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "run_not_started" and "exited with code 1" in err["message"]
    assert "submission_id" in err["details"]


def _seed_run(home: Path) -> tuple[str, str]:
    uri = resolve_settings(None, "", home).uri
    tracker = Tracker(uri)
    exp = prepare(TrackingSettings(uri, "seeded", home / "artifacts" / "mlflow"))
    parent = tracker.start_run(
        exp,
        "seeded",
        {
            TAG_ROLE: "workflow",
            TAG_WORKFLOW: "seeded",
            TAG_DRIVER_PID: "999999999",
            TAG_DRIVER_HOST: socket.gethostname(),
        },
    )
    child = tracker.start_run(
        exp,
        "train",
        {TAG_ROLE: "stage", TAG_STAGE: "train", TAG_KIND: "finetune", TAG_ORDER: "0", TAG_STATE: "running"},
        parent_run_id=parent,
    )
    tracker.log_metrics(child, {"loss": 1.5})
    log = home / "logs" / child / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    return parent, child


def test_runs_stages_logs_and_cancel(api: dict[str, Any], home: Path) -> None:
    parent, child = _seed_run(home)
    c, h = api["client"], _h(api, "reader")
    runs = c.get("/v1/runs", headers=h).json()
    assert [r["run_id"] for r in runs] == [parent]
    assert c.get("/v1/runs?workflow=other", headers=h).json() == []
    assert c.get("/v1/runs?workflow=it's", headers=h).json() == []  # quoted into the MLflow filter
    assert [r["run_id"] for r in c.get("/v1/runs?workflow=seeded", headers=h).json()] == [parent]
    run = c.get(f"/v1/runs/{parent}", headers=h).json()
    assert run["status"] == "RUNNING"
    (stage,) = run["stages"]
    assert stage["name"] == "train" and stage["state"] == "running" and stage["metrics"] == {"loss": 1.5}
    assert c.get(f"/v1/runs/{child}", headers=h).status_code == 404  # a stage run is not a workflow run
    assert c.get(f"/v1/runs/{'0' * 32}", headers=h).json()["error"]["code"] == "not_found"
    assert c.get("/v1/runs/../../etc", headers=h).status_code == 404
    logs = c.get(f"/v1/runs/{parent}/stages/train/logs?tail=2", headers=h)
    assert logs.status_code == 200 and logs.text == "line 8\nline 9\n"
    miss = c.get(f"/v1/runs/{parent}/stages/trian/logs", headers=h)
    assert miss.status_code == 404 and "did you mean 'train'?" in miss.json()["error"]["message"]
    # cancel: its driver (a pid that does not exist) is gone, so the run is marked KILLED
    assert c.post(f"/v1/runs/{parent}/cancel", headers=h).status_code == 403
    r = c.post(f"/v1/runs/{parent}/cancel", headers=_h(api, "submitter"))
    assert r.status_code == 200 and r.json()["cancelled"] is True and r.json()["status"] == "KILLED"
    again = c.post(f"/v1/runs/{parent}/cancel", headers=_h(api, "submitter")).json()
    assert again["cancelled"] is False and "KILLED" in again["message"]


def test_unknown_route_and_bad_query_use_the_error_shape(api: dict[str, Any]) -> None:
    r = api["client"].get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api["client"].get("/v1/runs?limit=0", headers=_h(api, "reader"))
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "query.limit"


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_token_create_and_serve_refusals(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from forgeline.cli import app

    runner = CliRunner()
    tokens = tmp_path / "tokens.yaml"
    r = runner.invoke(
        app, ["api", "token", "create", "ops", "--scopes", "read,promote", "--tokens", str(tokens)]
    )
    assert r.exit_code == 0, r.output
    raw = r.stdout.strip().splitlines()[-1]
    assert raw.startswith("flt_")
    (entry,) = load_tokens(tokens).values()
    assert entry.subject == "ops" and entry.scopes == ["promote", "read"]
    bad = runner.invoke(app, ["api", "token", "create", "x", "--scopes", "admin", "--tokens", str(tokens)])
    assert bad.exit_code == 2 and "scopes must be among read, submit, promote" in bad.output
    open_bind = runner.invoke(app, ["api", "--no-auth", "--host", "0.0.0.0", "--home", str(tmp_path)])
    assert open_bind.exit_code == 2 and "only on a loopback address" in open_bind.output
    no_tokens = runner.invoke(app, ["api", "--home", str(tmp_path / "h")])
    assert no_tokens.exit_code == 2 and "forgeline api token create" in no_tokens.output


@pytest.mark.slow  # ~9 s: the stand-in driver imports MLflow
def test_cancel_sends_a_second_sigint_when_the_first_is_lost(api: dict[str, Any], home: Path) -> None:
    """A driver that lets the first SIGINT pass (as one still starting Ray can) gets a second one."""
    import subprocess
    import sys
    import textwrap

    parent, _ = _seed_run(home)
    uri = api["settings"].tracking_uri
    ready = home / "child-ready"
    script = textwrap.dedent(
        f"""
        import signal, time
        from pathlib import Path
        from forgeline.tracking import Tracker
        seen = []
        def on_int(signum, frame):
            seen.append(signum)
            if len(seen) == 2:
                Tracker({uri!r}).end_run({parent!r}, "KILLED")
                raise SystemExit(130)
        signal.signal(signal.SIGINT, on_int)
        Tracker({uri!r}).get_run({parent!r})  # imports and store open before saying ready
        Path({str(ready)!r}).touch()
        while True:
            time.sleep(0.05)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the stand-in driver did not start"
            time.sleep(0.05)
        Tracker(uri).set_tags(parent, {TAG_DRIVER_PID: str(child.pid)})
        r = api["client"].post(f"/v1/runs/{parent}/cancel", headers=_h(api, "submitter"))
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "KILLED" and "were cancelled" in r.json()["message"]
        assert child.wait(timeout=10) == 130
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
