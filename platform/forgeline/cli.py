"""The ``forgeline`` command: validate, plan, run, resume, status, runs, ui, schema.

A thin layer: it parses arguments, calls the spec/plan/runtime/tracking services, and renders results.
Workflow problems print as ``file:line:col: field: message`` and exit 1 without a traceback (``-v``
shows one); a failed stage exits 1 with its error; Ctrl-C exits 130 after marking runs KILLED.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from forgeline.runtime import CANCEL_WAIT_S
from forgeline.spec import LoadedWorkflow, WorkflowError, load_workflow, schema_json

if TYPE_CHECKING:
    from forgeline.plan import Selection

app = typer.Typer(
    name="forgeline",
    help="From a workflow YAML to a production LLM endpoint: fine-tune, compress, build, serve, promote.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide tables when piped (rich falls back to 80 columns without a terminal).
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")]
Home = Annotated[
    Path | None,
    typer.Option(
        "--home", help="State directory (default ./.forgeline or FORGELINE_HOME).", show_default=False
    ),
]
Only = Annotated[
    list[str] | None,
    typer.Option("--only", help="Run only this stage and what it needs (repeatable); nothing downstream."),
]
RerunFrom = Annotated[
    list[str] | None,
    typer.Option("--from", help="Rerun this stage and everything downstream even if cached (repeatable)."),
]


def _home(home: Path | None) -> Path:
    from forgeline.tracking import default_home

    return home.resolve() if home else default_home()


def _fail(exc: BaseException, verbose: bool, code: int = 1) -> typer.Exit:
    if verbose:
        import traceback

        traceback.print_exception(exc)
    if isinstance(exc, WorkflowError):
        for p in exc.problems:
            err.print(str(p), markup=False, highlight=False, soft_wrap=True)
        n = len(exc.problems)
        err.print(f"{n} problem{'s' if n != 1 else ''} found", style="red")
    else:
        err.print(f"error: {exc}", markup=False, highlight=False, style="red", soft_wrap=True)
    return typer.Exit(code)


def _load(path: Path, verbose: bool) -> LoadedWorkflow:
    try:
        return load_workflow(path)
    except WorkflowError as e:
        raise _fail(e, verbose) from None


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Workflow files.")],
    verbose: Verbose = False,
) -> None:
    """Check workflow files: syntax, types, references, datasets, cycles. Exit 1 on any problem."""
    problems: list[Any] = []
    for f in files:
        try:
            loaded = load_workflow(f)
            out.print(f"{f}: ok ({len(loaded.workflow.stages)} stages)", highlight=False)
        except WorkflowError as e:
            if verbose:
                import traceback

                traceback.print_exception(e)
            problems.extend(e.problems)
    if problems:
        raise _fail(WorkflowError(problems), False)


@app.command()
def plan(
    file: Annotated[Path, typer.Argument(help="Workflow file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Say why each stage would (not) run.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Plan as if nothing were cached.")] = False,
    only: Only = None,
    rerun_from: RerunFrom = None,
    home: Home = None,
    verbose: Verbose = False,
) -> None:
    """Show the DAG, resources, memory/GPU-hour estimates, cache keys and what would run."""
    from forgeline.plan import Selection, human_bytes, human_count
    from forgeline.runtime import make_planner

    loaded = _load(file, verbose)
    selection = Selection(tuple(only or ()), tuple(rerun_from or ()))
    try:
        the_plan = make_planner(loaded, _home(home)).build(use_cache=not no_cache, selection=selection)
    except Exception as e:
        raise _fail(e, verbose) from None
    if as_json:
        print(json.dumps(the_plan.to_json(), indent=2))
    else:
        table = Table(title=f"{loaded.workflow.name} ({file})")
        for col in (
            "#",
            "stage",
            "kind",
            "needs",
            "cpus",
            "gpus",
            "params",
            "mem/device",
            "gpu-h",
            "key",
            "status",
        ):
            table.add_column(col, overflow="fold")
        for i, sp in enumerate(the_plan.stages, 1):
            kind = sp.kind + (f"/{sp.backend}" if sp.backend else "")
            table.add_row(
                str(i),
                sp.name,
                kind,
                ",".join(sp.deps) or "-",
                f"{sp.total_cpus:g}",
                str(sp.gpus),
                human_count(sp.shape.parameters) if sp.shape else "?",
                human_bytes(sp.memory.per_device_bytes) if sp.memory else "-",
                f"{sp.gpu_hours:.3g}" if sp.gpu_hours is not None else "-",
                (sp.key or "")[:12] or "pending",
                "[red]blocked[/]" if sp.problems else sp.status,
            )
        out.print(table)
        for sp in the_plan.stages:
            for line in sp.launch:
                out.print(f"[bold]{sp.name}[/]: {line}", highlight=False)
        if explain:
            for sp in the_plan.stages:
                out.print(f"[bold]{sp.name}[/]: {'; '.join(sp.reasons)}", highlight=False)
                for w in sp.warnings:
                    out.print(f"  warning: {w}", highlight=False)
                if sp.memory and explain:
                    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in sp.memory.parts.items())
                    notes = f" ({'; '.join(sp.memory.notes)})" if sp.memory.notes else ""
                    out.print(f"  memory per device: {parts}{notes}", highlight=False)
    if the_plan.problems():
        raise _fail(WorkflowError(the_plan.problems()), verbose)


def _run(
    file: Path,
    home: Path | None,
    ray_address: str | None,
    no_cache: bool,
    verbose: bool,
    resume_run_id: str | None = None,
    text: str | None = None,
    selection: Selection | None = None,
    target: str | None = None,
) -> None:
    import dataclasses

    from forgeline.plan import Selection
    from forgeline.runtime import RaySettings, RunSettings, StageFailed, run_workflow
    from forgeline.runtime._progress import Progress

    try:
        loaded = load_workflow(file, text=text)
    except WorkflowError as e:
        raise _fail(e, verbose) from None
    if target is not None:  # --target: where endpoints go this time, the file unchanged
        loaded = dataclasses.replace(loaded, workflow=loaded.workflow.model_copy(update={"target": target}))
    selection = selection or Selection()
    settings = RunSettings(
        home=_home(home),
        ray=RaySettings(address=ray_address),
        use_cache=not no_cache,
        selection=selection,
    )
    try:
        shown = selection.selected(loaded.workflow)
    except Exception as e:
        raise _fail(e, verbose) from None
    progress = Progress([s.name for s in loaded.workflow.stages if s.name in shown], console=err)
    try:
        with progress:
            summary = run_workflow(loaded, settings, progress=progress, resume_run_id=resume_run_id)
    except KeyboardInterrupt:
        err.print("cancelled: running stages were cancelled and the MLflow runs marked KILLED", style="red")
        raise typer.Exit(130) from None
    except StageFailed as e:
        s = e.summary
        err.print(f"run {s.run_id} FAILED: {e}", style="red", markup=False)
        err.print(f"resume after fixing: forgeline resume {s.run_id}", markup=False)
        raise typer.Exit(1) from None
    except Exception as e:
        raise _fail(e, verbose) from None
    _print_summary(summary, settings.home, loaded.workflow)


def _print_summary(summary: Any, home: Path, workflow: Any) -> None:
    counts: dict[str, int] = {}
    for o in summary.stages.values():
        counts[o.state] = counts.get(o.state, 0) + 1
    out.print(
        f"[green]run {summary.run_id} {summary.state}[/]: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        highlight=False,
    )
    for o in summary.stages.values():
        if o.record is not None:
            for name, value in o.record.outputs.items():
                if value["type"] == "value":
                    out.print(f"  {o.name}.{name} = {value['value']}", highlight=False)
            if o.record.meta.get("kind") == "deploy" and "endpoint" in o.record.outputs:
                url = o.record.outputs["endpoint"]["value"]
                # The deploy operator serves the model under the endpoint's name.
                model = getattr(workflow.stage(o.name), "endpoint_name", None) or workflow.name
                body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 16})
                out.print(
                    f"  try:      curl {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'",
                    highlight=False,
                    soft_wrap=True,
                )
    out.print(f"  tracking: {summary.tracking_uri} (experiment {summary.experiment_id})", highlight=False)
    home_flag = "" if home == _home(None) else f" --home {home}"
    out.print(f"  stages:   forgeline status {summary.run_id}{home_flag}", highlight=False)
    out.print(f"  MLflow UI: forgeline ui{home_flag}  ->  http://127.0.0.1:5000", highlight=False)


RayAddress = Annotated[
    str | None, typer.Option("--ray-address", help="Existing Ray cluster (default: embedded local Ray).")
]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Rerun every stage.")]


class Target(enum.StrEnum):
    local = "local"
    kubernetes = "kubernetes"


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Workflow file.")],
    ray_address: RayAddress = None,
    no_cache: NoCache = False,
    only: Only = None,
    rerun_from: RerunFrom = None,
    home: Home = None,
    verbose: Verbose = False,
    target: Annotated[
        Target | None,
        typer.Option("--target", help="Where endpoints go, overriding the workflow's `target:`."),
    ] = None,
    on: Annotated[
        str | None,
        typer.Option("--on", help="`kubernetes`: submit the whole workflow as a KubeRay RayJob and return."),
    ] = None,
    namespace: Annotated[
        str, typer.Option("--namespace", help="Namespace of the RayJob (--on).")
    ] = "default",
    artifacts_pvc: Annotated[
        str, typer.Option("--artifacts-pvc", help="PVC holding the Forgeline home on the cluster (--on).")
    ] = "forgeline-artifacts",
    image: Annotated[
        str | None, typer.Option("--image", help="Forgeline image for the Ray pods (--on).")
    ] = None,
) -> None:
    """Run a workflow. Finished stages are reused (cache); a rerun continues where it stopped."""
    from forgeline.plan import Selection

    if on is not None:
        _submit(file, on, namespace, artifacts_pvc, image, verbose)
        return
    selection = Selection(tuple(only or ()), tuple(rerun_from or ()))
    _run(
        file,
        home,
        ray_address,
        no_cache,
        verbose,
        selection=selection,
        target=target.value if target else None,
    )


def _submit(file: Path, on: str, namespace: str, pvc: str, image: str | None, verbose: bool) -> None:
    """``run --on kubernetes``: the workflow (+ small datasets) as a ConfigMap and a KubeRay RayJob."""
    if on != "kubernetes":
        raise _fail(ValueError(f"--on {on!r}: the only cluster kind is `kubernetes`"), verbose)
    from forgeline_operators.kube import kuberay
    from forgeline_operators.kube.submit import SubmitError, submission, submit
    from forgeline_operators.lib.kube_client import NoCluster, connect

    loaded = _load(file, verbose)
    try:
        objects = submission(
            loaded, namespace=namespace, artifacts_pvc=pvc, image=image or kuberay.FORGELINE_IMAGE
        )
        job = submit(connect(), objects)
    except (SubmitError, NoCluster) as e:
        raise _fail(e, verbose) from None
    name = job["metadata"]["name"]
    out.print(f"submitted RayJob {namespace}/{name} (uid {job['metadata'].get('uid')})", highlight=False)
    out.print(f"  watch: kubectl -n {namespace} get rayjob {name} -w", highlight=False)
    out.print(f"  logs:  kubectl -n {namespace} logs -l job-name={name} -f", highlight=False)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of the workflow run.")],
    ray_address: RayAddress = None,
    home: Home = None,
    verbose: Verbose = False,
) -> None:
    """Continue a failed, killed or interrupted run in place, from its first unfinished stage."""
    from forgeline.tracking import TAG_WORKFLOW_FILE, Tracker, resolve_settings

    h = _home(home)
    tracker = Tracker(resolve_settings(None, "", h).uri)
    try:
        parent = tracker.get_run(run_id)
        path = Path(parent.data.tags[TAG_WORKFLOW_FILE])
        local = tracker.client.download_artifacts(run_id, "workflow.yaml")
        text = Path(local).read_text()
    except Exception as e:
        raise _fail(RuntimeError(f"cannot resume {run_id}: {e}"), verbose) from None
    if parent.info.status == "FINISHED":
        out.print(f"run {run_id} already FINISHED; nothing to resume")
        return
    from forgeline.plan import Selection

    selection = Selection.from_tags(parent.data.tags)
    _run(path, home, ray_address, False, verbose, resume_run_id=run_id, text=text, selection=selection)


@app.command()
def cancel(
    run_id: Annotated[str, typer.Argument(help="Workflow run id.")],
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            help="Seconds to wait for the driver after a SIGINT; one still running then gets a second.",
        ),
    ] = CANCEL_WAIT_S,
    home: Home = None,
    verbose: Verbose = False,
) -> None:
    """Cancel a running workflow: its driver cancels running stages and marks the runs KILLED.

    Exits 1 when the driver is still running after the second SIGINT (follow the run, or cancel again).
    """
    # The shared cancel (forgeline.runtime.cancel_run), as the REST API's: this only prints its result.
    from forgeline import runtime
    from forgeline.tracking import Tracker, resolve_settings

    if wait <= 0:
        raise typer.BadParameter("must be positive", param_hint="--wait")
    tracker = Tracker(resolve_settings(None, "", _home(home)).uri)
    try:
        result = runtime.cancel_run(tracker, run_id, wait_s=wait)
    except (runtime.RunNotFound, runtime.NotCancellableHere) as e:
        raise _fail(e, verbose) from None
    out.print(result.message, highlight=False)
    if result.outcome == "still_running":
        raise typer.Exit(1)


@app.command()
def gc(
    keep_days: Annotated[float, typer.Option(help="Keep stage results younger than this.")] = 7.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    home: Home = None,
) -> None:
    """Free disk: remove cached stage results that nothing needs any more.

    Kept: results younger than --keep-days, the latest result of every stage of every workflow (what a
    rerun reuses), and every directory a registered MLflow model version points at.
    """
    from forgeline.artifacts import StageStore
    from forgeline.plan import human_bytes
    from forgeline.tracking import TAG_URI, Tracker, resolve_settings

    h = _home(home)
    store = StageStore(h / "artifacts")
    protected = store.indexed_keys()
    tracker = Tracker(resolve_settings(None, "", h).uri)
    prefix = store.stages_dir.resolve().as_uri() + "/"
    for mv in tracker.client.search_model_versions(max_results=10000):
        uri = str((mv.tags or {}).get(TAG_URI) or mv.source)  # a tracking server's versions point by tag
        if uri.startswith(prefix):
            protected.add(uri[len(prefix) :].split("/", 1)[0])
    removed = store.collect(protected, keep_days * 86400, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for key, size in removed:
        out.print(f"{verb} {key[:12]}  {human_bytes(size)}", highlight=False)
    total = sum(size for _, size in removed)
    out.print(f"{verb} {len(removed)} stage results, {human_bytes(total)}; kept {len(protected)} protected")


@app.command()
def status(
    run_id: Annotated[str | None, typer.Argument(help="Workflow run id (default: the latest).")] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh every 2 s until the run ends (Ctrl-C leaves).")
    ] = False,
    home: Home = None,
    verbose: Verbose = False,
) -> None:
    """Stage table of a workflow run, read from MLflow; running stages show their live metrics."""
    import time

    from rich.live import Live

    from forgeline.tracking import Tracker, resolve_settings

    tracker = Tracker(resolve_settings(None, "", _home(home)).uri)
    try:
        if run_id is None:
            runs = tracker.workflow_runs(tracker.experiment_ids(), max_results=1)
            if not runs:
                out.print("no runs yet")
                return
            run_id = runs[0].info.run_id
        table, running = _status_table(tracker, run_id)
    except Exception as e:
        raise _fail(e, verbose) from None
    if not watch or not running:
        out.print(table)
        return
    try:
        with Live(table, console=out, refresh_per_second=1) as live:
            while running:
                time.sleep(2.0)
                table, running = _status_table(tracker, run_id)
                live.update(table)
    except KeyboardInterrupt:
        pass


def _status_table(tracker: Any, run_id: str) -> tuple[Table, bool]:
    """The stage table and whether the workflow run is still RUNNING."""
    import time

    from forgeline.tracking import TAG_CACHE_KEY, TAG_ERROR, TAG_KIND, TAG_STAGE, TAG_STATE

    parent = tracker.get_run(run_id)
    children = tracker.child_runs(parent.info.experiment_id, run_id)
    table = Table(title=f"{parent.info.run_name} {run_id} [{parent.info.status}]")
    for col in ("stage", "kind", "state", "seconds", "key", "metrics / error"):
        table.add_column(col, overflow="fold")
    now_ms = time.time() * 1000
    for c in children:
        tags, metrics = c.data.tags, c.data.metrics
        dur = ""
        if c.info.end_time and c.info.start_time:
            dur = f"{(c.info.end_time - c.info.start_time) / 1000:.1f}"
        elif c.info.status == "RUNNING" and c.info.start_time:
            dur = f"{(now_ms - c.info.start_time) / 1000:.0f}…"  # still going
        # Training stages log per step: show where they are first.
        shown = sorted(metrics.items(), key=lambda kv: (kv[0] not in ("step", "epoch", "loss"), kv[0]))
        info = tags.get(TAG_ERROR) or ", ".join(f"{k}={v:.4g}" for k, v in shown[:5])
        table.add_row(
            tags.get(TAG_STAGE, c.info.run_name),
            tags.get(TAG_KIND, ""),
            tags.get(TAG_STATE, c.info.status.lower()),
            dur,
            tags.get(TAG_CACHE_KEY, "")[:12],
            info,
        )
    return table, parent.info.status == "RUNNING"


@app.command()
def logs(
    stage: Annotated[str, typer.Argument(help="Stage name.")],
    run_id: Annotated[
        str | None, typer.Option("--run", help="Workflow run id (default: the latest).")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the stage ends.")
    ] = False,
    tail: Annotated[int | None, typer.Option("--tail", help="Only the last N lines.")] = None,
    home: Home = None,
    verbose: Verbose = False,
) -> None:
    """A stage's log (its stdout and logging), from this machine or from the run's MLflow artifacts."""
    import time

    from forgeline.spec import did_you_mean
    from forgeline.tracking import TAG_STAGE, Tracker, resolve_settings

    h = _home(home)
    tracker = Tracker(resolve_settings(None, "", h).uri)
    try:
        if run_id is None:
            latest = tracker.workflow_runs(tracker.experiment_ids(), max_results=1)
            if not latest:
                raise RuntimeError("no runs yet")
            run_id = latest[0].info.run_id
        parent = tracker.get_run(run_id)
        children = {
            c.data.tags.get(TAG_STAGE, ""): c for c in tracker.child_runs(parent.info.experiment_id, run_id)
        }
        if stage not in children:
            hint = did_you_mean(stage, children) or f"stages: {', '.join(sorted(children))}"
            raise RuntimeError(f"run {run_id} has no stage {stage!r} ({hint})")
    except Exception as e:
        raise _fail(e, verbose) from None
    child = children[stage]
    path = h / "logs" / child.info.run_id / f"{stage}.log"
    if not path.exists():
        try:
            path = Path(tracker.client.download_artifacts(child.info.run_id, f"logs/{stage}.log"))
        except Exception:
            state = child.data.tags.get("forgeline.state", child.info.status.lower())
            why = "it was cached, so it did not run in this run" if state == "cached" else f"state {state}"
            raise _fail(
                RuntimeError(f"no log for stage {stage!r} of run {run_id} ({why})"), verbose
            ) from None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
        sys.stdout.write("".join(lines[-tail:] if tail else lines))
        sys.stdout.flush()
        while follow and tracker.get_run(child.info.run_id).info.status in ("RUNNING", "SCHEDULED"):
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.5)
        if follow:
            sys.stdout.write(f.read())


@app.command()
def runs(
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    home: Home = None,
) -> None:
    """List workflow runs, newest first."""
    import datetime

    from forgeline.tracking import TAG_STATE, TAG_WORKFLOW, Tracker, resolve_settings

    tracker = Tracker(resolve_settings(None, "", _home(home)).uri)
    table = Table()
    for col in ("run id", "workflow", "status", "state", "started"):
        table.add_column(col)
    for r in tracker.workflow_runs(tracker.experiment_ids(), max_results=limit):
        started = datetime.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            r.info.run_id,
            r.data.tags.get(TAG_WORKFLOW, ""),
            r.info.status,
            r.data.tags.get(TAG_STATE, ""),
            started,
        )
    out.print(table)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    home: Home = None,
) -> None:
    """Start the MLflow UI on the embedded store."""
    from forgeline.tracking import resolve_settings

    settings = resolve_settings(None, "", _home(home))
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    cmd = [
        mlflow,
        "ui",
        "--backend-store-uri",
        settings.uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    out.print(f"MLflow UI on http://{host}:{port} (store {settings.uri}); Ctrl-C stops it", highlight=False)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    try:
        raise typer.Exit(subprocess.call(cmd, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
def schema(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON Schema path.")] = Path(
        "workflows/schema.json"
    ),
    reference: Annotated[Path, typer.Option(help="Markdown reference path.")] = Path(
        "docs/workflow-reference.md"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if a file is stale.")] = False,
    crds: Annotated[
        Path | None,
        typer.Option(help="Directory of the generated CRDs (default: k8s/crds when -o is the default)."),
    ] = None,
) -> None:
    """Write the workflow JSON Schema (for editors), the reference docs and the Kubernetes CRDs; --check
    verifies them."""
    from forgeline.spec import reference_markdown

    files = [(output, schema_json()), (reference, reference_markdown())]
    if crds is None and output == Path("workflows/schema.json"):
        crds = Path("k8s/crds")
    if crds is not None:
        from forgeline_operators.kube.crds import crd_files

        files += [(crds / name, text) for name, text in crd_files().items()]
    stale = []
    for path, text in files:
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out.print(f"wrote {path}", highlight=False)
    if stale:
        err.print(f"stale: {', '.join(map(str, stale))}: run `forgeline schema`", highlight=False)
        raise typer.Exit(1)
    if check:
        out.print("schema and reference are current")


__import__("forgeline._cli_serving", fromlist=["register"]).register(app)  # serve, endpoints, bench
__import__("forgeline._cli_promote", fromlist=["register"]).register(app)  # promote, rollback, history
__import__("forgeline._cli_api", fromlist=["register"]).register(app)  # api, api token create
__import__("forgeline._cli_k8s", fromlist=["register"]).register(app)  # render


def main() -> None:
    """The console entry point: the one place an error the user can act on that no command formatted
    itself (any :class:`~forgeline.errors.ForgelineError`) becomes its message and exit code 1, without
    a traceback (``-v`` / ``--verbose`` shows it); any other exception is a bug and shows one."""
    from forgeline.errors import ForgelineError

    try:
        app()
    except ForgelineError as e:
        verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:])
        raise SystemExit(_fail(e, verbose).exit_code) from None


if __name__ == "__main__":
    main()
