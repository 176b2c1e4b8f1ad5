"""Routes for workflows and runs: submit (or dry-run) a workflow YAML, list and read runs with their
stage statuses from MLflow (what ``forgeline status`` shows), cancel a run (what ``forgeline cancel``
does), and read a stage's log (what ``forgeline logs`` prints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field

from forgeline.api import _submit
from forgeline.api._auth import Principal, require
from forgeline.api._errors import ERROR_RESPONSES, ApiError, ErrorBody
from forgeline.api._settings import ApiSettings
from forgeline.runtime import TAG_SUBMITTER
from forgeline.tracking import (
    TAG_CACHE_KEY,
    TAG_ERROR,
    TAG_KIND,
    TAG_ROLE,
    TAG_STAGE,
    TAG_STATE,
    TAG_WORKFLOW,
    Tracker,
)

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

RunId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="MLflow run id of a workflow run.")]
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/plain")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubmissionOut(_Out):
    submission_id: str = Field(
        description="Id of the stored submission (`<home>/api/submissions/<id>.yaml`)."
    )
    workflow: str = Field(description="Workflow name.")
    submitter: str = Field(description="Who submitted it (the token's subject); recorded on the run.")
    run_id: str | None = Field(description="MLflow run id, or null if the driver has not opened it yet.")
    status_url: str = Field(description="Where to follow it: the run, or the submission until it has one.")


class SubmissionStatus(_Out):
    submission_id: str = Field(description="Submission id.")
    workflow: str = Field(description="Workflow name.")
    submitter: str = Field(description="Who submitted it.")
    run_id: str | None = Field(description="MLflow run id once the driver opened it.")
    driver_running: bool = Field(description="Whether the `forgeline run` process is still alive.")
    exit_code: int | None = Field(description="Exit code if the driver ended before opening a run.")
    log_tail: str = Field(description="Last lines of the driver's output.")


class PlanOut(_Out):
    workflow: str = Field(description="Workflow name.")
    plan: dict[str, Any] = Field(description="`forgeline plan --json` of the workflow.")


class StageOut(_Out):
    name: str = Field(description="Stage name.")
    kind: str = Field(description="Stage kind.")
    status: str = Field(description="MLflow status of the stage's child run.")
    state: str = Field(description="pending|running|succeeded|cached|failed|killed|skipped.")
    run_id: str = Field(description="MLflow child run id.")
    started_at: float | None = Field(description="Unix time the stage started.")
    ended_at: float | None = Field(description="Unix time the stage ended.")
    cache_key: str | None = Field(description="Content key of the stage result.")
    metrics: dict[str, float] = Field(description="Latest metrics.")
    error: str | None = Field(description="Why it failed.")


class RunOut(_Out):
    run_id: str = Field(description="MLflow run id.")
    workflow: str = Field(description="Workflow name.")
    experiment_id: str = Field(description="MLflow experiment id.")
    status: str = Field(description="MLflow status: RUNNING, FINISHED, FAILED, KILLED.")
    state: str | None = Field(description="Forgeline state tag (running, succeeded, failed, killed).")
    submitter: str | None = Field(description="Who submitted it (API runs).")
    started_at: float | None = Field(description="Unix time.")
    ended_at: float | None = Field(description="Unix time.")
    error: str | None = Field(description="First failure.")


class RunDetail(RunOut):
    stages: list[StageOut] = Field(description="Stages in plan order.")


class CancelOut(_Out):
    run_id: str = Field(description="Run id.")
    cancelled: bool = Field(description="Whether this call acted on it (false: it was not running).")
    status: str = Field(description="MLflow status when the call returned.")
    message: str = Field(description="What happened.")


def _settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def _ms(value: int | None) -> float | None:
    return value / 1000 if value else None


def _run_out(run: Any) -> dict[str, Any]:
    tags = run.data.tags
    return {
        "run_id": run.info.run_id,
        "workflow": tags.get(TAG_WORKFLOW, run.info.run_name or ""),
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "state": tags.get(TAG_STATE),
        "submitter": tags.get(TAG_SUBMITTER),
        "started_at": _ms(run.info.start_time),
        "ended_at": _ms(run.info.end_time),
        "error": tags.get(TAG_ERROR),
    }


def _workflow_run(tracker: Tracker, run_id: str) -> Any:
    try:
        run = tracker.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.data.tags.get(TAG_ROLE) != "workflow":
        raise ApiError(404, "not_found", f"no workflow run {run_id}")
    return run


@router.post(
    "/workflows",
    status_code=202,
    summary="Submit a workflow YAML (or plan it with ?dry_run=true)",
    response_model=SubmissionOut | PlanOut,
    responses={
        200: {"model": PlanOut, "description": "dry_run: the plan."},
        422: {"model": ErrorBody, "description": "Every problem with file, line, col, field, hint."},
        415: {"model": ErrorBody, "description": "The body is not sent as YAML / plain text."},
        500: {"model": ErrorBody, "description": "The driver exited before opening its run."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {t: {"schema": {"type": "string"}} for t in YAML_TYPES},
        }
    },
)
async def submit_workflow(
    request: Request,
    response: Response,
    who: Annotated[Principal, require("submit")],
    dry_run: Annotated[bool, Query(description="Validate and plan only; nothing runs.")] = False,
) -> Any:
    from starlette.concurrency import run_in_threadpool

    settings = _settings(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in YAML_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the workflow YAML as one of {', '.join(YAML_TYPES)} (got {ctype or 'none'!r})",
        )
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_workflow", "the workflow must be UTF-8 text") from None
    # Parsing, planning and waiting for MLflow block: keep them off the event loop.
    loaded = await run_in_threadpool(_submit.validate_text, text, settings)
    plan = await run_in_threadpool(_submit.plan_json, loaded, settings)
    if dry_run:
        response.status_code = 200
        return PlanOut(workflow=loaded.workflow.name, plan=plan)
    out = await run_in_threadpool(_start, request, loaded, who.subject)
    response.headers["Location"] = out.status_url
    return out


def _reap(request: Request) -> None:
    """Collect the exit status of finished drivers (children of this server), so none stays a zombie."""
    processes = request.app.state.processes
    for sub_id, proc in list(processes.items()):
        if proc.poll() is not None:
            processes.pop(sub_id, None)  # requests run in threads: another may have taken it


def _start(request: Request, loaded: Any, submitter: str) -> SubmissionOut:
    settings = _settings(request)
    sub = _submit.new_submission(loaded, settings, submitter)
    _reap(request)
    proc = request.app.state.launcher(settings, sub)
    sub.pid = proc.pid if proc is not None else None
    if proc is not None:
        request.app.state.processes[sub.id] = proc
    _submit.save(settings, sub)
    sub = _submit.wait_for_run(settings, sub, proc, settings.submit_wait_s)
    if sub.run_id is None and sub.exit_code is not None:
        raise ApiError(
            500,
            "run_not_started",
            f"`forgeline run` exited with code {sub.exit_code} before opening its run; see details.log_tail",
            {"submission_id": sub.id, "log_tail": _submit.log_tail(sub.log)},
        )
    where = f"/v1/runs/{sub.run_id}" if sub.run_id else f"/v1/submissions/{sub.id}"
    return SubmissionOut(
        submission_id=sub.id,
        workflow=sub.workflow,
        submitter=sub.submitter,
        run_id=sub.run_id,
        status_url=where,
    )


@router.get("/submissions/{submission_id}", response_model=SubmissionStatus, summary="A submission")
def get_submission(
    request: Request,
    submission_id: Annotated[str, PathParam(pattern=r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")],
    who: Annotated[Principal, require("read")],
) -> SubmissionStatus:
    settings = _settings(request)
    sub = _submit.load(settings, submission_id)
    if sub is None:
        raise ApiError(404, "not_found", f"no submission {submission_id}")
    from forgeline.artifacts import pid_alive

    proc = request.app.state.processes.get(submission_id)
    code = proc.poll() if proc is not None else None
    # A driver launched before a server restart is no child of this process: ask the OS.
    alive = code is None if proc is not None else bool(sub.pid and pid_alive(sub.pid))
    _reap(request)
    if sub.run_id is None:
        sub.run_id = _submit.find_run(settings, sub)
        if sub.run_id is None and code is not None:
            sub.exit_code = code
        _submit.save(settings, sub)
    return SubmissionStatus(
        submission_id=sub.id,
        workflow=sub.workflow,
        submitter=sub.submitter,
        run_id=sub.run_id,
        driver_running=alive,
        exit_code=sub.exit_code,
        log_tail=_submit.log_tail(sub.log),
    )


@router.get("/runs", response_model=list[RunOut], summary="Workflow runs, newest first")
def list_runs(
    request: Request,
    who: Annotated[Principal, require("read")],
    limit: Annotated[int, Query(ge=1, le=500, description="How many.")] = 50,
    workflow: Annotated[str | None, Query(max_length=200, description="Only this workflow.")] = None,
) -> list[dict[str, Any]]:
    tracker = Tracker(_settings(request).tracking_uri)
    filter_string = f"tags.`{TAG_ROLE}` = 'workflow'"
    if workflow is not None:
        quoted = workflow.replace("\\", "\\\\").replace("'", "\\'")
        filter_string += f" and tags.`{TAG_WORKFLOW}` = '{quoted}'"
    found = tracker.client.search_runs(
        tracker.experiment_ids(),
        filter_string=filter_string,
        max_results=limit,
        order_by=["attributes.start_time DESC"],
    )
    return [_run_out(r) for r in found]


@router.get("/runs/{run_id}", response_model=RunDetail, summary="A run and its stages")
def get_run(request: Request, run_id: RunId, who: Annotated[Principal, require("read")]) -> dict[str, Any]:
    tracker = Tracker(_settings(request).tracking_uri)
    run = _workflow_run(tracker, run_id)
    stages = []
    for c in tracker.child_runs(run.info.experiment_id, run_id):
        tags = c.data.tags
        stages.append(
            {
                "name": tags.get(TAG_STAGE, c.info.run_name or ""),
                "kind": tags.get(TAG_KIND, ""),
                "status": c.info.status,
                "state": tags.get(TAG_STATE, c.info.status.lower()),
                "run_id": c.info.run_id,
                "started_at": _ms(c.info.start_time),
                "ended_at": _ms(c.info.end_time),
                "cache_key": tags.get(TAG_CACHE_KEY),
                "metrics": dict(c.data.metrics),
                "error": tags.get(TAG_ERROR),
            }
        )
    return {**_run_out(run), "stages": stages}


@router.post(
    "/runs/{run_id}/cancel",
    response_model=CancelOut,
    summary="Cancel a running workflow",
    responses={409: {"model": ErrorBody, "description": "Driven from another host."}},
)
def cancel_run(request: Request, run_id: RunId, who: Annotated[Principal, require("submit")]) -> CancelOut:
    # The shared cancel (forgeline.runtime.cancel_run): this route only maps its result and errors.
    from forgeline import runtime

    settings = _settings(request)
    try:
        result = runtime.cancel_run(Tracker(settings.tracking_uri), run_id, wait_s=settings.cancel_wait_s)
    except runtime.RunNotFound as e:
        raise ApiError(404, "not_found", str(e)) from None
    except runtime.NotCancellableHere as e:
        raise ApiError(409, "not_cancellable_here", str(e)) from None
    return CancelOut(run_id=run_id, cancelled=result.cancelled, status=result.status, message=result.message)


@router.get(
    "/runs/{run_id}/stages/{stage}/logs",
    response_model=None,
    summary="A stage's log",
    # The log is text; errors stay JSON (so response_class is left at the JSON default).
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "The log."}},
)
def stage_logs(
    request: Request,
    run_id: RunId,
    stage: Annotated[str, PathParam(max_length=200, description="Stage name.")],
    who: Annotated[Principal, require("read")],
    tail: Annotated[int | None, Query(ge=1, le=100_000, description="Only the last N lines.")] = None,
) -> PlainTextResponse:
    from forgeline.spec import did_you_mean

    settings = _settings(request)
    tracker = Tracker(settings.tracking_uri)
    run = _workflow_run(tracker, run_id)
    children = {c.data.tags.get(TAG_STAGE, ""): c for c in tracker.child_runs(run.info.experiment_id, run_id)}
    if stage not in children:
        hint = did_you_mean(stage, children) or f"stages: {', '.join(sorted(children))}"
        raise ApiError(404, "not_found", f"run {run_id} has no stage {stage!r} ({hint})")
    child = children[stage]
    path = settings.home / "logs" / child.info.run_id / f"{stage}.log"
    if not path.is_file():
        try:
            path = Path(tracker.client.download_artifacts(child.info.run_id, f"logs/{stage}.log"))
        except Exception:
            state = child.data.tags.get(TAG_STATE, child.info.status.lower())
            why = "it was cached, so it did not run in this run" if state == "cached" else f"state {state}"
            raise ApiError(404, "no_log", f"no log for stage {stage!r} of run {run_id} ({why})") from None
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    return PlainTextResponse("".join(lines[-tail:] if tail else lines))
