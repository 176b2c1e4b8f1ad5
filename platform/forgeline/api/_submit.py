"""Workflow submission: validate a YAML body exactly like ``forgeline validate`` / ``plan`` (plus what a
remote caller may touch, :mod:`._safety`), store it under ``<home>/api/submissions/<id>.yaml`` and start
``forgeline run`` on it as a detached process (own session, log file next to the YAML).

The run id is learned the way ``forgeline run`` makes it known: its driver opens the MLflow parent run
tagged with its own pid and host (``forgeline.driver_pid``/``forgeline.driver_host``), so the API polls
for the workflow run carrying the launched pid, started after the launch. The submitter travels in
``FORGELINE_SUBMITTER`` and the driver records it as the ``forgeline.submitter`` tag.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgeline.api._errors import ApiError
from forgeline.api._safety import (
    absolute_datasets,
    dataset_problems,
    model_uri_problems,
    structure_problem,
    tracking_problems,
)
from forgeline.api._settings import ApiSettings
from forgeline.runtime import SUBMITTER_ENV
from forgeline.spec import LoadedWorkflow, Problem, WorkflowError, load_workflow
from forgeline.tracking import TAG_DRIVER_HOST, TAG_DRIVER_PID, TAG_ROLE, Tracker

log = logging.getLogger("forgeline.api")


def problem_json(p: Problem) -> dict[str, Any]:
    return {
        "file": p.file,
        "line": p.line,
        "col": p.col,
        "field": p.field,
        "message": p.message,
        "hint": p.hint,
        "text": str(p),
    }


def _invalid(problems: list[Problem]) -> ApiError:
    ordered = WorkflowError(problems).problems
    n = len(ordered)
    head = "; ".join(str(p) for p in ordered[:3])
    return ApiError(
        422,
        "invalid_workflow",
        f"{n} problem{'s' if n != 1 else ''} found: {head}" + (" …" if n > 3 else ""),
        [problem_json(p) for p in ordered],
    )


def validate_text(text: str, settings: ApiSettings, file: str = "workflow.yaml") -> LoadedWorkflow:
    """The loaded workflow, or ApiError 422 with every problem (file/line/col/field/message/hint)."""
    bomb = structure_problem(text, settings.max_yaml_nodes, file)
    if bomb is not None:
        raise _invalid([bomb])
    outside = dataset_problems(text, settings.data_root, file)
    if outside:
        raise _invalid(outside)
    # Parsed as if it lay in the data root, so relative dataset paths resolve there.
    location = settings.data_root.resolve() / file
    try:
        loaded = load_workflow(location, text=text)
    except WorkflowError as e:
        shown = str(location)
        raise _invalid([_rename(p, shown, file) for p in e.problems]) from None
    except Exception as e:  # a loader bug must not become a 500 with a traceback
        log.exception("the workflow loader failed on a submission")
        raise ApiError(
            422, "unreadable_workflow", f"the workflow could not be read ({type(e).__name__}): {e}"
        ) from None
    problems = model_uri_problems(loaded, settings.artifact_root, file)
    problems += tracking_problems(loaded, settings.tracking_uri, file)
    if problems:
        raise _invalid(problems)
    return loaded


def _rename(p: Problem, shown: str, file: str) -> Problem:
    if p.file != shown:
        return p
    return Problem(p.message, file, p.line, p.col, p.field, p.hint)


def plan_json(loaded: LoadedWorkflow, settings: ApiSettings, file: str = "workflow.yaml") -> dict[str, Any]:
    """``forgeline plan --json`` of the workflow; ApiError 422 with the plan's problems."""
    from forgeline.runtime import make_planner

    try:
        plan = make_planner(loaded, settings.home, tracking_uri=settings.tracking_uri).build(use_cache=True)
    except WorkflowError as e:
        raise _invalid(list(e.problems)) from None
    except Exception as e:
        raise ApiError(422, "unplannable_workflow", f"cannot plan the workflow: {e}") from None
    problems = plan.problems()
    if problems:
        shown = str(loaded.path)
        raise _invalid([_rename(p, shown, file) for p in problems])
    data: dict[str, Any] = plan.to_json()
    return data


@dataclass
class Submission:
    """One accepted workflow: where its YAML and log are, and the launched driver."""

    id: str
    workflow: str
    submitter: str
    path: Path
    log: Path
    created_at: float
    pid: int | None = None
    run_id: str | None = None
    exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workflow": self.workflow,
            "submitter": self.submitter,
            "path": str(self.path),
            "log": str(self.log),
            "created_at": self.created_at,
            "pid": self.pid,
            "run_id": self.run_id,
            "exit_code": self.exit_code,
        }


# (settings, submission) -> the launched process; a seam so unit tests can stand in for the subprocess.
Launcher = Callable[[ApiSettings, Submission], "subprocess.Popen[bytes] | None"]


def new_submission(loaded: LoadedWorkflow, settings: ApiSettings, submitter: str) -> Submission:
    sub_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    folder = settings.submissions_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sub_id}.yaml"
    path.write_text(absolute_datasets(loaded.text, settings.data_root), encoding="utf-8")
    return Submission(
        id=sub_id,
        workflow=loaded.workflow.name,
        submitter=submitter,
        path=path,
        log=folder / f"{sub_id}.log",
        created_at=time.time(),
    )


def launch_detached(settings: ApiSettings, sub: Submission) -> subprocess.Popen[bytes]:
    """``forgeline run`` in a session of its own: it outlives the API server, and a cancel (SIGINT to
    the driver) reaches it alone, never the server's process group."""
    env = {
        **os.environ,
        SUBMITTER_ENV: sub.submitter,
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "FORGELINE_HOME": str(settings.home),
    }
    cmd = [sys.executable, "-m", "forgeline.cli", "run", str(sub.path), "--home", str(settings.home)]
    with open(sub.log, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=settings.home,
            env=env,
            start_new_session=True,
        )


def save(settings: ApiSettings, sub: Submission) -> None:
    record = settings.submissions_dir / f"{sub.id}.json"
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sub.to_json(), indent=2))
    os.replace(tmp, record)


def load(settings: ApiSettings, sub_id: str) -> Submission | None:
    record = settings.submissions_dir / f"{sub_id}.json"
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    data["path"], data["log"] = Path(data["path"]), Path(data["log"])
    return Submission(**data)


def find_run(settings: ApiSettings, sub: Submission) -> str | None:
    """The workflow run opened by the submission's driver, if it exists yet."""
    if sub.pid is None:
        return None
    tracker = Tracker(settings.tracking_uri)
    since = int(sub.created_at * 1000) - 1000
    runs = tracker.client.search_runs(
        tracker.experiment_ids(),
        filter_string=(
            f"tags.`{TAG_ROLE}` = 'workflow' and tags.`{TAG_DRIVER_PID}` = '{sub.pid}' "
            f"and tags.`{TAG_DRIVER_HOST}` = '{socket.gethostname()}' and attributes.start_time >= {since}"
        ),
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return str(runs[0].info.run_id) if runs else None


def log_tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def wait_for_run(
    settings: ApiSettings, sub: Submission, proc: subprocess.Popen[bytes] | None, wait_s: float
) -> Submission:
    """Poll MLflow until the driver's run appears, the driver exits, or ``wait_s`` passes."""
    deadline = time.monotonic() + wait_s
    while True:
        sub.run_id = find_run(settings, sub)
        if sub.run_id is not None:
            break
        code = proc.poll() if proc is not None else None
        if code is not None:
            sub.run_id = find_run(settings, sub)  # it may have finished between the two reads
            if sub.run_id is None:
                sub.exit_code = code
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    save(settings, sub)
    return sub
