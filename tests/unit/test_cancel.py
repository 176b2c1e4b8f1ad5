"""The one cancel (``forgeline.runtime.cancel_run``) over a real MLflow SQLite store and real signals:
a stand-in driver that lets the first SIGINT pass gets a second one; a driver that dies without closing
its run is reaped; runs that are not running, not workflow runs or driven from another host are
refused. ``forgeline cancel`` and ``POST /v1/runs/{id}/cancel`` both call it and only format it."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from forgeline import runtime
from forgeline.runtime import CancelResult, NotCancellableHere, RunNotFound, cancel_run
from forgeline.tracking import (
    TAG_DRIVER_HOST,
    TAG_DRIVER_PID,
    TAG_ROLE,
    TAG_STATE,
    TAG_WORKFLOW,
    Tracker,
    TrackingSettings,
    prepare,
    resolve_settings,
)


def _seed(home: Path, pid: int = 999_999_999, host: str | None = None) -> tuple[Tracker, str, str]:
    """A RUNNING workflow run with one RUNNING stage, driven by ``pid`` on ``host``."""
    uri = resolve_settings(None, "", home).uri
    tracker = Tracker(uri)
    exp = prepare(TrackingSettings(uri, "cancel", home / "artifacts" / "mlflow"))
    tags = {TAG_ROLE: "workflow", TAG_WORKFLOW: "cancel", TAG_DRIVER_PID: str(pid)}
    tags[TAG_DRIVER_HOST] = host or socket.gethostname()
    parent = tracker.start_run(exp, "cancel", tags)
    child = tracker.start_run(exp, "s", {TAG_ROLE: "stage", TAG_STATE: "running"}, parent_run_id=parent)
    return tracker, parent, child


def _stand_in(home: Path, uri: str, run_id: str, closes_run: bool) -> subprocess.Popen[bytes]:
    """A driver that counts SIGINTs and stops only at the second, as one still starting Ray can.

    closes_run: it marks the run KILLED on its way out (the driver's Ctrl-C path; needs MLflow, ~5 s
    to import); otherwise it just exits, as a driver interrupted in the middle of its cleanup."""
    ready, seen = home / "stand-in-ready", home / "stand-in-signals"
    # The store is opened before "ready", so closing the run takes milliseconds, as in the driver.
    opened = f"tracker = Tracker({uri!r}); tracker.get_run({run_id!r})" if closes_run else ""
    script = textwrap.dedent(
        f"""
        import signal, time
        from pathlib import Path
        {"from forgeline.tracking import Tracker" if closes_run else ""}
        {opened}
        count = []
        def on_int(signum, frame):
            count.append(signum)
            Path({str(seen)!r}).write_text(str(len(count)))
            if len(count) == 2:
                {f"tracker.end_run({run_id!r}, 'KILLED')" if closes_run else "pass"}
                raise SystemExit(130)
        signal.signal(signal.SIGINT, on_int)
        Path({str(ready)!r}).touch()
        while True:
            time.sleep(0.02)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the stand-in driver did not start"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize(
    "closes_run", [False, pytest.param(True, marks=pytest.mark.slow, id="closes-its-run")]
)
def test_a_lost_first_sigint_gets_a_second(home: Path, closes_run: bool) -> None:
    tracker, parent, child = _seed(home)
    proc = _stand_in(home, tracker.uri, parent, closes_run)
    try:
        tracker.set_tags(parent, {TAG_DRIVER_PID: str(proc.pid)})
        t0 = time.monotonic()
        result = cancel_run(tracker, parent, wait_s=1.0, poll_s=0.05)
        assert proc.wait(timeout=10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (home / "stand-in-signals").read_text() == "2"  # the first was ignored, the second stopped it
    assert result.signals == 2 and result.pid == proc.pid and result.cancelled
    assert result.status == "KILLED" and tracker.get_run(parent).info.status == "KILLED"
    assert time.monotonic() - t0 >= 1.0  # it waited wait_s before the second signal
    if closes_run:
        assert result.outcome == "stopped"
        assert "2 times (the first was lost): its stages were cancelled" in result.message
    else:  # it exited without closing its run: reaped, stage runs included
        assert result.outcome == "reaped" and "exited without closing its run" in result.message
        assert tracker.get_run(child).info.status == "KILLED"


def test_a_driver_that_ignores_both_is_reported_still_running(home: Path) -> None:
    tracker, parent, _ = _seed(home)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
         f"open({str(home / 'up')!r}, 'w').close(); time.sleep(60)"]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (home / "up").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        tracker.set_tags(parent, {TAG_DRIVER_PID: str(proc.pid)})
        result = cancel_run(tracker, parent, wait_s=0.2, poll_s=0.05)
    finally:
        proc.kill()
        proc.wait()
    assert (result.outcome, result.signals, result.status) == ("still_running", 2, "RUNNING")
    assert "has not stopped yet" in result.message


def test_dead_driver_not_running_wrong_host_and_unknown_runs(home: Path) -> None:
    tracker, parent, child = _seed(home)  # pid 999999999 does not exist
    gone = cancel_run(tracker, parent)
    assert (gone.outcome, gone.status, gone.signals, gone.cancelled) == ("reaped", "KILLED", 0, True)
    assert gone.message == f"the driver of run {parent} is gone; marked KILLED"
    again = cancel_run(tracker, parent)
    assert (again.outcome, again.cancelled) == ("not_running", False)
    assert again.message == f"run {parent} is KILLED; nothing to cancel"
    _, elsewhere, _ = _seed(home, host="other-host")
    with pytest.raises(NotCancellableHere, match="driven from host 'other-host'; cancel it there"):
        cancel_run(tracker, elsewhere)
    for not_a_workflow_run in (child, "0" * 32):
        with pytest.raises(RunNotFound, match=f"no workflow run {not_a_workflow_run}"):
            cancel_run(tracker, not_a_workflow_run)
    with pytest.raises(ValueError, match="wait_s must be positive"):
        cancel_run(tracker, parent, wait_s=0)


# ------------------------------------------------------------------ the faces only format the result


class FakeCancel:
    """Stands in for the shared cancel: records each call and answers from ``answers`` in order."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.answers: list[CancelResult | Exception] = []

    def __call__(self, tracker: Tracker, run_id: str, *, wait_s: float, poll_s: float = 0.2) -> CancelResult:
        self.calls.append({"uri": tracker.uri, "run_id": run_id, "wait_s": wait_s})
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def fake_cancel(monkeypatch: pytest.MonkeyPatch) -> FakeCancel:
    fake = FakeCancel()
    monkeypatch.setattr(runtime, "cancel_run", fake)  # both faces look it up there at call time
    return fake


RUN = "a" * 32


def test_cli_cancel_prints_the_shared_result(fake_cancel: FakeCancel, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from forgeline.cli import app

    fake_cancel.answers += [
        CancelResult(RUN, "stopped", "KILLED", 42, 2),
        CancelResult(RUN, "still_running", "RUNNING", 42, 2),
        RunNotFound(f"no workflow run {RUN}"),
    ]
    runner = CliRunner()
    home = ["--home", str(tmp_path)]
    ok = runner.invoke(app, ["cancel", RUN, "--wait", "2.5", *home])
    assert ok.exit_code == 0, ok.output
    assert f"sent SIGINT to driver 42 of run {RUN} 2 times (the first was lost)" in ok.stdout
    assert fake_cancel.calls[-1] == {
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "run_id": RUN,
        "wait_s": 2.5,
    }
    still = runner.invoke(app, ["cancel", RUN, *home])
    assert still.exit_code == 1 and "has not stopped yet" in still.stdout
    assert fake_cancel.calls[-1]["wait_s"] == runtime.CANCEL_WAIT_S  # the API's default wait
    missing = runner.invoke(app, ["cancel", RUN, *home])
    assert missing.exit_code == 1 and f"no workflow run {RUN}" in missing.output
    bad = runner.invoke(app, ["cancel", RUN, "--wait", "0", *home])
    assert bad.exit_code == 2 and len(fake_cancel.calls) == 3  # refused before any call


def test_api_cancel_returns_the_shared_result(fake_cancel: FakeCancel, home: Path) -> None:
    from fastapi.testclient import TestClient

    from forgeline.api import ApiSettings, create_app

    fake_cancel.answers += [
        CancelResult(RUN, "stopped", "KILLED", 42, 1),
        RunNotFound(f"no workflow run {RUN}"),
        NotCancellableHere(RUN, "other-host"),
    ]
    uri = resolve_settings(None, "", home).uri
    settings = ApiSettings(home=home, tracking_uri=uri, data_root=home, no_auth=True, cancel_wait_s=1.5)
    client = TestClient(create_app(settings))
    r = client.post(f"/v1/runs/{RUN}/cancel")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "run_id": RUN,
        "cancelled": True,
        "status": "KILLED",
        "message": f"sent SIGINT to driver 42 of run {RUN}: its stages were cancelled and the runs "
        "marked KILLED",
    }
    assert fake_cancel.calls[-1] == {"uri": uri, "run_id": RUN, "wait_s": 1.5}
    missing = client.post(f"/v1/runs/{RUN}/cancel")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    elsewhere = client.post(f"/v1/runs/{RUN}/cancel")
    assert elsewhere.status_code == 409 and elsewhere.json()["error"]["code"] == "not_cancellable_here"
    assert "other-host" in elsewhere.json()["error"]["message"]
