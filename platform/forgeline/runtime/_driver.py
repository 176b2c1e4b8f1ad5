"""The driver: plans a workflow, then runs its stages as Ray tasks in dependency order.

For each stage whose dependencies are done, the driver computes the cache key from the upstream
*content* and either reuses the published result or submits a Ray task. It owns the MLflow parent run
and the per-stage child runs (pending stages are SCHEDULED so ``status`` shows the whole DAG), stops
starting stages after a failure, cancels running tasks on Ctrl-C, and marks runs left RUNNING by a
dead driver as KILLED. A rerun -- or ``resume`` -- continues from the first unfinished stage because
finished stages are published atomically and found again by key.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgeline.artifacts import StageRecord, StageStore, clean_staging, pid_alive
from forgeline.errors import ForgelineError
from forgeline.plan import Plan, Planner, Selection, stage_params
from forgeline.registry import OperatorRegistry, default_registry
from forgeline.runtime._model_store import model_store
from forgeline.runtime._ray import RaySettings, ensure_ray
from forgeline.runtime._worker import StageTask, execute
from forgeline.spec import LoadedWorkflow, WorkflowError
from forgeline.tracking import (
    TAG_CACHE_KEY,
    TAG_CACHED,
    TAG_DRIVER_HOST,
    TAG_DRIVER_PID,
    TAG_ERROR,
    TAG_KIND,
    TAG_OPERATOR_VERSION,
    TAG_ORDER,
    TAG_ROLE,
    TAG_STAGE,
    TAG_STATE,
    TAG_WORKFLOW,
    TAG_WORKFLOW_FILE,
    Tracker,
    TrackingSettings,
    prepare,
    resolve_settings,
)

ProgressFn = Callable[[str, str, dict[str, Any]], None]  # (stage, state, detail)
# Who submitted a run: RunSettings.submitter, else $FORGELINE_SUBMITTER (set by the REST API's launcher).
TAG_SUBMITTER = "forgeline.submitter"
SUBMITTER_ENV = "FORGELINE_SUBMITTER"


@dataclass(frozen=True)
class RunSettings:
    """How to run: where state lives, Ray, caching, and who watches progress."""

    home: Path
    ray: RaySettings = field(default_factory=RaySettings)
    use_cache: bool = True
    tracking_uri: str | None = None  # overrides the workflow's tracking.uri
    poll_s: float = 0.2
    selection: Selection = field(default_factory=Selection)  # --only / --from; resume keeps the run's
    submitter: str | None = None  # who asked for the run (the REST API passes the token's subject)


@dataclass
class StageOutcome:
    name: str
    state: str  # succeeded | cached | failed | killed | skipped
    run_id: str | None = None
    key: str | None = None
    record: StageRecord | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class RunSummary:
    run_id: str
    experiment_id: str
    workflow: str
    state: str  # FINISHED | FAILED | KILLED
    stages: dict[str, StageOutcome]
    tracking_uri: str

    @property
    def failed(self) -> StageOutcome | None:
        return next((s for s in self.stages.values() if s.state == "failed"), None)


class StageFailed(ForgelineError):
    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        failed = summary.failed
        super().__init__(f"stage {failed.name!r} failed: {failed.error}" if failed else "run failed")


def tracking_settings(loaded: LoadedWorkflow, settings: RunSettings) -> TrackingSettings:
    wf = loaded.workflow
    return resolve_settings(
        settings.tracking_uri or wf.tracking.uri, wf.tracking.experiment or wf.name, settings.home
    )


def make_planner(
    loaded: LoadedWorkflow,
    home: Path,
    registry: OperatorRegistry | None = None,
    tracking_uri: str | None = None,
) -> Planner:
    reg = registry or default_registry()
    models = model_store(home, tracking_uri or tracking_settings(loaded, RunSettings(home=home)).uri, reg)
    return Planner(loaded, reg, models, StageStore(models.root))


def reap_dead_drivers(tracker: Tracker, experiment_id: str) -> list[str]:
    """Mark RUNNING workflow runs whose driver process is gone (same host) as KILLED."""
    host = socket.gethostname()
    reaped = []
    runs = tracker.client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'workflow' and attributes.status = 'RUNNING'",
        max_results=200,
    )
    for run in runs:
        tags = run.data.tags
        pid = int(tags.get(TAG_DRIVER_PID, "0") or 0)
        if tags.get(TAG_DRIVER_HOST) != host or pid <= 0 or pid_alive(pid):
            continue
        for child in tracker.child_runs(experiment_id, run.info.run_id):
            if child.info.status in ("RUNNING", "SCHEDULED"):
                tracker.set_tags(child.info.run_id, {TAG_STATE: "killed", TAG_ERROR: "driver process died"})
                tracker.end_run(child.info.run_id, "KILLED")
        tracker.set_tags(run.info.run_id, {TAG_STATE: "killed", TAG_ERROR: "driver process died"})
        tracker.end_run(run.info.run_id, "KILLED")
        reaped.append(run.info.run_id)
    return reaped


class Driver:
    def __init__(
        self,
        loaded: LoadedWorkflow,
        settings: RunSettings,
        registry: OperatorRegistry | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self.loaded = loaded
        self.settings = settings
        self.registry = registry or default_registry()
        self.explicit_registry = registry is not None
        self.progress = progress or (lambda stage, state, detail: None)
        self.tracking = tracking_settings(loaded, settings)
        self.planner = make_planner(loaded, settings.home, self.registry, self.tracking.uri)
        self.store = self.planner.store
        self.tracker: Tracker | None = None
        # Ray object ref -> (stage, start time, task) of the stages in flight; Ctrl-C cancels these.
        self._running: dict[Any, tuple[str, float, StageTask]] = {}
        self._remote: Any = None  # the Ray task wrapper, created when the first stage must run
        self._remote_isolated: Any = None  # the same in a worker process used for one stage only
        self._started_ray = False
        self.selection = settings.selection
        self._forced: set[str] = set()

    # ------------------------------------------------------------------ main
    def run(self, resume_run_id: str | None = None) -> RunSummary:
        if resume_run_id and self.selection.is_default:
            # A resumed run keeps the --only / --from it was started with.
            self.selection = Selection.from_tags(Tracker(self.tracking.uri).get_run(resume_run_id).data.tags)
        plan = self.planner.build(use_cache=self.settings.use_cache, selection=self.selection)
        problems = plan.problems()
        if problems:
            raise WorkflowError(problems)
        clean_staging(self.store.stages_dir)
        clean_staging(self.planner.models.models_dir)
        experiment_id = prepare(self.tracking)  # migrate the DB before any worker touches it
        tracker = self.tracker = Tracker(self.tracking.uri)
        reap_dead_drivers(tracker, experiment_id)
        parent, children = self._open_runs(tracker, experiment_id, plan, resume_run_id)
        outcomes: dict[str, StageOutcome] = {}
        try:
            state = self._loop(tracker, plan, parent, children, outcomes)
        except KeyboardInterrupt:
            self._finish(tracker, parent, children, outcomes, "KILLED")
            raise
        finally:
            if self._started_ray:
                import ray

                ray.shutdown()
        self._finish(tracker, parent, children, outcomes, state)
        summary = RunSummary(
            parent, experiment_id, self.loaded.workflow.name, state, outcomes, self.tracking.uri
        )
        if state == "FAILED":
            raise StageFailed(summary)
        return summary

    def _open_runs(
        self, tracker: Tracker, experiment_id: str, plan: Plan, resume_run_id: str | None
    ) -> tuple[str, dict[str, str]]:
        wf = self.loaded.workflow
        driver_tags = {
            TAG_DRIVER_PID: str(os.getpid()),
            TAG_DRIVER_HOST: socket.gethostname(),
            TAG_STATE: "running",
        }
        children: dict[str, str] = {}
        self._forced = {sp.name for sp in plan.stages if sp.forced}
        if resume_run_id:
            tracker.reopen_run(resume_run_id)
            tracker.set_tags(resume_run_id, driver_tags)
            for child in tracker.child_runs(experiment_id, resume_run_id):
                name = child.data.tags.get(TAG_STAGE, "")
                children[name] = child.info.run_id
                if child.info.status == "FINISHED":
                    self._forced.discard(name)  # rerun once by this run already: now its cache is fresh
            parent = resume_run_id
        else:
            submitter = self.settings.submitter or os.environ.get(SUBMITTER_ENV)
            parent = tracker.start_run(
                experiment_id,
                wf.name,
                {
                    TAG_ROLE: "workflow",
                    TAG_WORKFLOW: wf.name,
                    TAG_WORKFLOW_FILE: str(self.loaded.path),
                    "mlflow.user": os.environ.get("FORGELINE_USER") or os.environ.get("USER") or "unknown",
                    **({TAG_SUBMITTER: submitter} if submitter else {}),
                    **driver_tags,
                    **({} if self.selection.is_default else self.selection.to_tags()),
                },
            )
            tracker.log_text(parent, self.loaded.text, "workflow.yaml")
            tracker.log_json(parent, plan.to_json(), "plan.json")
        for order, sp in enumerate(plan.stages):
            if sp.name in children or not sp.selected:
                continue
            run_id = tracker.start_run(
                experiment_id,
                sp.name,
                {
                    TAG_ROLE: "stage",
                    TAG_WORKFLOW: wf.name,
                    TAG_STAGE: sp.name,
                    TAG_KIND: sp.kind,
                    TAG_ORDER: str(order),
                    TAG_STATE: "pending",
                },
                parent_run_id=parent,
            )
            tracker.client.update_run(run_id, status="SCHEDULED")
            children[sp.name] = run_id
        return parent, children

    def _loop(
        self,
        tracker: Tracker,
        plan: Plan,
        parent: str,
        children: dict[str, str],
        outcomes: dict[str, StageOutcome],
    ) -> str:
        wf = self.loaded.workflow
        records: dict[str, StageRecord] = {}
        running = self._running
        order = [sp.name for sp in plan.stages if sp.selected]
        failed = False
        while True:
            if not failed:
                for name in order:
                    if name in outcomes or any(t[0] == name for t in running.values()):
                        continue
                    deps = wf.dependencies(name)
                    if not all(d in records for d in deps):
                        continue
                    ref_task = self._start_stage(tracker, plan, name, records, children, outcomes)
                    if ref_task is not None:
                        running[ref_task[0]] = (name, time.time(), ref_task[1])
            if not running:
                break
            import ray

            done, _ = ray.wait(list(running), num_returns=1, timeout=self.settings.poll_s)
            for ref in done:
                name, t0, task = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # the worker process itself died (OOM, segfault)
                    result = {
                        "ok": False,
                        "error": f"worker died: {e}",
                        "metrics": {},
                        "seconds": time.time() - t0,
                    }
                ok = self._complete_stage(tracker, name, task, result, children, outcomes)
                if ok:
                    records[name] = outcomes[name].record  # type: ignore[assignment]
                else:
                    failed = True
            self._enforce_timeouts(tracker, running, children, outcomes)
            if any(o.state == "failed" for o in outcomes.values()):
                failed = True
        for name in order:
            if name not in outcomes:
                outcomes[name] = StageOutcome(name, "skipped", children.get(name))
                self.progress(name, "skipped", {})
        # A stage can fail without ever running (unschedulable), so decide from the outcomes.
        return "FAILED" if any(o.state == "failed" for o in outcomes.values()) else "FINISHED"

    def _start_stage(
        self,
        tracker: Tracker,
        plan: Plan,
        name: str,
        records: dict[str, StageRecord],
        children: dict[str, str],
        outcomes: dict[str, StageOutcome],
    ) -> tuple[Any, StageTask] | None:
        wf = self.loaded.workflow
        stage = wf.stage(name)
        sp = plan.stage(name)
        ki = self.planner.key_inputs(stage, records)
        assert ki is not None, "all dependencies are finished, so every key component is known"
        key = ki.key()
        run_id = children[name]
        op = sp.operator
        assert op is not None, "plan refuses to run a workflow with missing operators"
        base_tags = {
            **({"forgeline.rerun": "--from"} if name in self._forced else {}),
            TAG_CACHE_KEY: key,
            TAG_OPERATOR_VERSION: op.version,
            **_lineage_inputs(self.planner, stage, records),
        }
        use_cache = self.settings.use_cache and stage.cache and name not in self._forced
        hit = self.store.lookup(key) if use_cache else None
        check = op.load_cache_check() if hit is not None else None
        stale = check(hit, self.settings.home, self.tracking.uri) if check and hit else None
        if stale:
            self.progress(name, "stale", {"reason": f"cached result no longer valid: {stale}"})
            base_tags["forgeline.stale_cache"] = stale[:500]
            hit = None
        if hit is not None:
            tags = {**base_tags, **_lineage_outputs(hit), TAG_CACHED: "true", TAG_STATE: "cached"}
            tracker.log_all(run_id, metrics=hit.metrics, params=stage_params(stage), tags=tags)
            tracker.end_run(run_id, "FINISHED")
            outcomes[name] = StageOutcome(name, "cached", run_id, key, hit, dict(hit.metrics))
            records[name] = hit
            self.store.remember(wf.name, name, key, ki.components())
            self.progress(name, "cached", {"key": key, "metrics": hit.metrics})
            return None
        tracker.reopen_run(run_id)
        tracker.log_all(
            run_id, params=stage_params(stage), tags={**base_tags, TAG_CACHED: "false", TAG_STATE: "running"}
        )
        task = StageTask(
            loaded=self.loaded,
            stage_name=name,
            key=key,
            components=ki.components(),
            operator=op,
            # Every finished upstream stage (transitive): references read direct ones; register
            # records the metrics of upstream evaluate/quantize stages on the model version.
            records={d: records[d] for d in _ancestors(wf, name) if d in records},
            dataset_sha=plan.dataset_sha,
            home=self.settings.home,
            tracking=self.tracking,
            run_id=run_id,
            log_path=self.settings.home / "logs" / run_id / f"{name}.log",
            threads=max(1, int(sp.cpus)),
            registry=self.registry if self.explicit_registry else None,
            replace=name in self._forced,
        )
        task_cpus, task_gpus = sp.task_resources
        options: dict[str, Any] = {"num_cpus": task_cpus, "max_retries": 0, "name": f"forgeline:{name}"}
        if task_gpus:
            options["num_gpus"] = task_gpus
        if stage.resources and stage.resources.memory_gb:
            options["memory"] = int(stage.resources.memory_gb * 2**30)
        import ray

        if self._remote is None:
            self._started_ray = ensure_ray(self.settings.ray)
            self._remote = ray.remote(execute)
            # Stages that start Ray Train workers or hold GPUs run in a worker process of their own
            # that exits afterwards: what they leave behind (the Train controller actor they own, CUDA
            # memory) goes with it instead of into the next stage. A fresh process re-imports the
            # operator's libraries (measured: the quickstart's in-process finetune stages would cost
            # ~10 s more), so stages that do their work in the task keep reusing warm workers.
            self._remote_isolated = ray.remote(max_calls=1)(execute)
        # A request the cluster can never meet would wait forever: fail it now with the numbers.
        total = ray.cluster_resources()
        short = [
            f"{need:g} {res}"
            for res, need in (("CPU", sp.total_cpus), ("GPU", 0 if sp.remote else sp.gpus))
            if need > total.get(res, 0)
        ]
        if short:
            have = f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU"
            workers = f" ({sp.workers} Ray Train workers x {sp.cpus:g} CPU)" if sp.workers else ""
            msg = f"needs {' and '.join(short)}{workers} but the Ray cluster has {have} in total"
            self._complete_stage(
                tracker, name, task, {"ok": False, "error": msg, "seconds": 0.0}, children, outcomes
            )
            return None
        isolated = sp.workers > 0 or task_gpus > 0
        ref = (self._remote_isolated if isolated else self._remote).options(**options).remote(task)
        self.progress(name, "running", {"key": key})
        return ref, task

    def _complete_stage(
        self,
        tracker: Tracker,
        name: str,
        task: StageTask,
        result: dict[str, Any],
        children: dict[str, str],
        outcomes: dict[str, StageOutcome],
    ) -> bool:
        run_id = children[name]
        if task.log_path.exists():
            tracker.log_file(run_id, task.log_path, "logs")
        if result["ok"]:
            record: StageRecord = result["record"]
            tracker.set_tags(run_id, {**_lineage_outputs(record), TAG_STATE: "succeeded"})
            tracker.log_metrics(run_id, {"stage_seconds": result["seconds"]})
            tracker.end_run(run_id, "FINISHED")
            self.store.remember(self.loaded.workflow.name, name, task.key, task.components)
            outcomes[name] = StageOutcome(
                name,
                "succeeded",
                run_id,
                task.key,
                record,
                dict(result["metrics"]),
                seconds=result["seconds"],
            )
            self.progress(name, "succeeded", {"metrics": result["metrics"], "seconds": result["seconds"]})
            return True
        if result.get("metrics"):
            tracker.log_metrics(run_id, result["metrics"])
        tracker.set_tags(run_id, {TAG_STATE: "failed", TAG_ERROR: result["error"][:5000]})
        if result.get("traceback"):
            tracker.log_text(run_id, result["traceback"], "logs/traceback.txt")
        tracker.end_run(run_id, "FAILED")
        outcomes[name] = StageOutcome(
            name,
            "failed",
            run_id,
            task.key,
            None,
            dict(result.get("metrics") or {}),
            result["error"],
            result["seconds"],
        )
        self.progress(name, "failed", {"error": result["error"]})
        return False

    def _enforce_timeouts(
        self,
        tracker: Tracker,
        running: dict[Any, tuple[str, float, StageTask]],
        children: dict[str, str],
        outcomes: dict[str, StageOutcome],
    ) -> None:
        import ray

        wf = self.loaded.workflow
        for ref, (name, t0, task) in list(running.items()):
            limit = wf.stage(name).timeout_minutes
            if limit is None or time.time() - t0 < limit * 60:
                continue
            ray.cancel(ref, force=True)
            del running[ref]
            err = f"timed out after {limit:g} minutes (timeout_minutes)"
            self._complete_stage(
                tracker,
                name,
                task,
                {"ok": False, "error": err, "metrics": {}, "seconds": time.time() - t0},
                children,
                outcomes,
            )

    def _finish(
        self,
        tracker: Tracker,
        parent: str,
        children: dict[str, str],
        outcomes: dict[str, StageOutcome],
        state: str,
    ) -> None:
        if state == "KILLED" and self._running:
            import ray

            for task_ref in list(self._running):
                ray.cancel(task_ref, force=True)
            self._running.clear()
        for name, run_id in children.items():
            outcome = outcomes.get(name)
            if outcome is not None and outcome.state in ("succeeded", "cached", "failed"):
                continue
            label = "killed" if state == "KILLED" else "skipped"
            tracker.set_tags(run_id, {TAG_STATE: label})
            tracker.end_run(run_id, "KILLED")
            if outcome is None:
                outcomes[name] = StageOutcome(name, label, run_id)
        tracker.set_tags(
            parent, {TAG_STATE: {"FINISHED": "succeeded", "FAILED": "failed"}.get(state, "killed")}
        )
        failed = next((o for o in outcomes.values() if o.state == "failed"), None)
        if failed is not None:
            tracker.set_tags(parent, {TAG_ERROR: f"{failed.name}: {failed.error}"[:5000]})
        tracker.end_run(parent, state)


def _lineage_inputs(planner: Planner, stage: Any, records: dict[str, StageRecord]) -> dict[str, str]:
    from forgeline.spec import parse_ref

    tags: dict[str, str] = {}
    for fpath, ref in stage.refs().items():
        parsed = parse_ref(ref)
        if parsed is None or parsed[0] == "model":
            uri = ref if parsed is None else planner.workflow.model.base
            tags[f"forgeline.input.{fpath}.uri"] = uri
            tags[f"forgeline.input.{fpath}.sha256"] = planner.fingerprint(uri)
        else:
            rec = records[parsed[0]]
            path = rec.output_path(parsed[1] or "")
            tags[f"forgeline.input.{fpath}.uri"] = path.as_uri() if path else ref
            tags[f"forgeline.input.{fpath}.sha256"] = rec.output_digest(parsed[1] or "") or ""
    for fpath, ds in stage.dataset_refs().items():
        tags[f"forgeline.input.{fpath}.uri"] = planner.loaded.dataset_path(ds).as_uri()
        tags[f"forgeline.input.{fpath}.sha256"] = planner.dataset_sha.get(ds, "")
    return tags


def _lineage_outputs(record: StageRecord) -> dict[str, str]:
    tags: dict[str, str] = {"forgeline.output.digest": record.digest}
    for name, out in record.outputs.items():
        if out["type"] == "dir":
            tags[f"forgeline.output.{name}.uri"] = (record.path / name).as_uri()
            tags[f"forgeline.output.{name}.sha256"] = str(out["digest"])
        else:
            tags[f"forgeline.output.{name}.value"] = str(out["value"])
    return tags


def run_workflow(
    loaded: LoadedWorkflow,
    settings: RunSettings,
    registry: OperatorRegistry | None = None,
    progress: ProgressFn | None = None,
    resume_run_id: str | None = None,
) -> RunSummary:
    """Plan and run a workflow; raises WorkflowError (before anything runs) or StageFailed."""
    return Driver(loaded, settings, registry, progress).run(resume_run_id)


def _ancestors(wf: Any, name: str) -> list[str]:
    """Stages ``name`` depends on, directly or through others (dependency order not guaranteed)."""
    seen: list[str] = []
    todo = list(wf.dependencies(name))
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.append(dep)
            todo.extend(wf.dependencies(dep))
    return seen
