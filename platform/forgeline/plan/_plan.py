"""The plan: a workflow as a DAG of stages in topological order, each with its operator, resources,
estimates, cache key and cache status, and every problem that must stop the run before it starts
(operator not installed, a GPU-only option on CPU, a parallel layout the backend cannot do, a model
that does not fit the declared GPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgeline.artifacts import ModelStore, StageRecord, StageStore, UriError, parse_uri, sha256_file
from forgeline.plan._estimates import (
    GiB,
    MemoryEstimate,
    ModelShape,
    gpu_hours,
    shape_from_dir,
    shape_from_name,
)
from forgeline.plan._hooks import EstimateInputs, StageEstimate
from forgeline.plan._keys import KeyInputs, diff_components, stage_params
from forgeline.plan._select import Selection
from forgeline.registry import OperatorRegistry, OperatorSpec, ResourceRequest
from forgeline.spec import (
    BASE_MODEL_REF,
    LoadedWorkflow,
    Problem,
    StageBase,
    Workflow,
    parse_ref,
)


@dataclass
class StagePlan:
    name: str
    kind: str
    backend: str | None
    index: int  # position in the YAML
    deps: list[str]
    operator: OperatorSpec | None
    cpus: float  # per worker (or for the stage's task when it has no workers)
    gpus: int  # total for the stage
    workers: int = 0  # Ray Train workers the operator starts; 0: the stage's task does the work
    shape: ModelShape | None = None
    memory: MemoryEstimate | None = None
    tokens: int | None = None
    flops: float | None = None
    gpu_hours: float | None = None
    key_inputs: KeyInputs | None = None
    key: str | None = None
    cached: StageRecord | None = None
    selected: bool = True  # False: left out by --only
    forced: bool = False  # True: --from reruns it whatever its cache says
    reasons: list[str] = field(default_factory=list)  # why it would (not) run
    problems: list[Problem] = field(default_factory=list)  # block the run
    warnings: list[str] = field(default_factory=list)
    launch: list[str] = field(default_factory=list)  # what the operator would launch, where (describe hook)
    # True when the stage's GPU work runs on the cluster (workflow `target: kubernetes`: an EngineBuild Job, a
    # NeMo RayJob): `gpus` is what it asks of the cluster; the local Ray task that submits it holds none.
    remote: bool = False

    @property
    def total_cpus(self) -> float:
        return self.cpus * max(1, self.workers)

    @property
    def task_resources(self) -> tuple[float, int]:
        """(CPUs, GPUs) the stage's own Ray task reserves: none when its workers hold them (a
        coordinator holding them too would starve its workers: dp=2 on 2 CPUs would never start)."""
        if self.workers:
            return (0.0, 0)
        return (self.cpus, 0) if self.remote else (self.cpus, self.gpus)

    @property
    def status(self) -> str:
        if not self.selected:
            return "skip"
        if self.cached is not None:
            return "cached"
        return "run"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "backend": self.backend,
            "deps": self.deps,
            "operator": None
            if self.operator is None
            else {"entrypoint": self.operator.entrypoint, "version": self.operator.version},
            "resources": {"cpus": self.total_cpus, "gpus": self.gpus, "workers": self.workers},
            "parameters": self.shape.parameters if self.shape else None,
            "memory_per_device_bytes": self.memory.per_device_bytes if self.memory else None,
            "memory_parts": self.memory.parts if self.memory else None,
            "tokens": self.tokens,
            "flops": self.flops,
            "gpu_hours": self.gpu_hours,
            "key": self.key,
            "status": self.status,
            "forced": self.forced,
            "reasons": self.reasons,
            "problems": [str(p) for p in self.problems],
            "warnings": self.warnings,
            "launch": self.launch,
        }


@dataclass
class Plan:
    loaded: LoadedWorkflow
    stages: list[StagePlan]  # topological order
    dataset_sha: dict[str, str]

    @property
    def workflow(self) -> Workflow:
        return self.loaded.workflow

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def problems(self) -> list[Problem]:
        """What blocks the run; stages left out by ``--only`` block nothing."""
        return [p for s in self.stages if s.selected for p in s.problems]

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow.name,
            "file": str(self.loaded.path),
            "datasets": self.dataset_sha,
            "stages": [s.to_json() for s in self.stages],
            "problems": [str(p) for p in self.problems()],
        }


def topological_order(workflow: Workflow) -> list[str]:
    """Kahn's algorithm; ties broken by declaration order so plans are stable."""
    names = [s.name for s in workflow.stages]
    deps = {n: workflow.dependencies(n) for n in names}
    remaining = {n: set(d) for n, d in deps.items()}
    order: list[str] = []
    while remaining:
        ready = [n for n in names if n in remaining and not remaining[n]]
        if not ready:
            raise ValueError(f"dependency cycle among: {', '.join(sorted(remaining))}")
        n = ready[0]
        order.append(n)
        del remaining[n]
        for other in remaining.values():
            other.discard(n)
    return order


class Planner:
    """Builds plans and computes keys; the runtime reuses it to key stages as upstreams finish."""

    def __init__(
        self, loaded: LoadedWorkflow, registry: OperatorRegistry, models: ModelStore, store: StageStore
    ) -> None:
        self.loaded = loaded
        self.workflow = loaded.workflow
        self.registry = registry
        self.models = models
        self.store = store
        self.dataset_sha = {
            name: sha256_file(loaded.dataset_path(name)) for name in sorted(self.workflow.data)
        }
        self._fingerprints: dict[str, str] = {}
        self._shapes: dict[str, ModelShape | None] = {}

    # -------------------------------------------------------------- keys
    def fingerprint(self, uri: str) -> str:
        if uri not in self._fingerprints:
            self._fingerprints[uri] = self.models.fingerprint(uri, self.loaded.base_dir)
        return self._fingerprints[uri]

    def key_inputs(self, stage: StageBase, records: dict[str, StageRecord]) -> KeyInputs | None:
        """All key components, or None while an upstream output is not yet known."""
        op = self.registry.operator(_kind(stage), stage.backend_name())
        ki = KeyInputs(
            kind=_kind(stage),
            backend=stage.backend_name(),
            operator_version=op.version if op else "not-installed",
            params=stage_params(stage),
        )
        if op is not None and op.capabilities.target_bound:
            # Where the result lives: a local endpoint's record must not stand for a cluster rollout.
            ki.params = {**ki.params, "workflow.target": self.workflow.target}
        for fpath, ds in stage.dataset_refs().items():
            ki.datasets[fpath] = self.dataset_sha.get(ds, "missing")
            spec = self.workflow.data.get(ds)
            if spec is not None and spec.rendering != "auto":
                # A different rendering is different tokens: the same file must not hit the cache.
                ki.datasets[fpath] += f";rendering={spec.rendering}"
        refs = stage.refs()
        ref_stages = set()
        for fpath, ref in refs.items():
            parsed = parse_ref(ref)
            if parsed is None:
                ki.models[fpath] = self.fingerprint(ref)
            elif parsed[0] == "model":
                ki.models[fpath] = self.fingerprint(self.workflow.model.base)
            else:
                up, out = parsed
                ref_stages.add(up)
                rec = records.get(up)
                if rec is None:
                    return None
                ki.upstream[fpath] = rec.output_digest(out or "") or "missing"
        for dep in self.workflow.dependencies(stage.name):
            if dep in ref_stages:
                continue
            rec = records.get(dep)
            if rec is None:
                return None
            ki.upstream[f"after:{dep}"] = rec.digest
        return ki

    # -------------------------------------------------------------- plan
    def build(self, use_cache: bool = True, selection: Selection | None = None) -> Plan:
        selection = selection or Selection()
        selection.check(self.workflow)
        selected = selection.selected(self.workflow)
        forced = selection.forced(self.workflow)
        order = topological_order(self.workflow)
        index = {s.name: i for i, s in enumerate(self.workflow.stages)}
        records: dict[str, StageRecord] = {}
        plans: list[StagePlan] = []
        host_mem = _host_memory_bytes(self.workflow)
        for name in order:
            stage = self.workflow.stage(name)
            i = index[name]
            sp = self._stage_plan(stage, i)
            sp.selected, sp.forced = name in selected, name in forced
            sp.warnings.extend(self._unpinned(stage))
            self._estimate(stage, sp)
            self._check(stage, sp, host_mem)
            self._describe(stage, sp)
            ki = None
            try:
                ki = self.key_inputs(stage, records)
            except UriError as e:
                sp.problems.append(self.loaded.source.problem(f"stages[{i}]", str(e)))
            if ki is not None:
                sp.key_inputs = ki
                sp.key = ki.key()
                rec = self.store.lookup(sp.key) if (use_cache and stage.cache) else None
                if rec is not None and sp.forced:
                    # Downstream keys still see this content; the run replaces it if it changes.
                    records[name] = rec
                    sp.reasons.append(f"--from: rerun although cached (key {sp.key[:12]})")
                elif not sp.selected:
                    if rec is not None:
                        records[name] = rec
                    sp.reasons.append("not selected (--only)")
                elif rec is not None:
                    sp.cached = rec
                    records[name] = rec
                    sp.reasons.append(f"cached (key {sp.key[:12]})")
                else:
                    sp.reasons.extend(self._why_run(stage, sp, ki, use_cache))
            elif not sp.selected:
                sp.reasons.append("not selected (--only)")
            else:
                waiting = [d for d in sp.deps if d not in records]
                sp.reasons.append(f"runs after {', '.join(waiting)} (their outputs are part of its key)")
            plans.append(sp)
        return Plan(self.loaded, plans, dict(self.dataset_sha))

    def _why_run(self, stage: StageBase, sp: StagePlan, ki: KeyInputs, use_cache: bool) -> list[str]:
        if not stage.cache:
            return ["cache: false"]
        if not use_cache:
            return ["--no-cache"]
        last = self.store.last(self.workflow.name, stage.name)
        if last is None:
            return [f"never ran (key {sp.key[:12] if sp.key else '?'})"]
        if last["key"] == sp.key:
            return ["its last result is gone from the store"]
        return diff_components(last.get("components", {}), ki.components()) or ["key changed"]

    def _stage_plan(self, stage: StageBase, i: int) -> StagePlan:
        kind = _kind(stage)
        backend = stage.backend_name()
        res = self.workflow.resources
        op = self.registry.operator(kind, backend)
        hook = op.load_resources() if op is not None else None
        want = hook(stage, self.workflow, op.capabilities) if hook and op else ResourceRequest()
        gpus = want.gpus if res.device == "gpu" else 0
        if stage.resources and stage.resources.gpus is not None:
            gpus = stage.resources.gpus
        cpus = (
            stage.resources.cpus if stage.resources and stage.resources.cpus else None
        ) or res.cpus_per_stage
        return StagePlan(
            name=stage.name,
            kind=kind,
            backend=backend,
            index=i,
            deps=self.workflow.dependencies(stage.name),
            operator=op,
            cpus=cpus,
            gpus=gpus,
            workers=want.workers,
            remote=want.remote,
        )

    # --------------------------------------------------------- estimates
    def shape_of(self, ref: str) -> ModelShape | None:
        """The shape of the model a Ref denotes (stage outputs inherit their input's shape)."""
        if ref in self._shapes:
            return self._shapes[ref]
        parsed = parse_ref(ref)
        shape: ModelShape | None
        if parsed is None:
            shape = self._shape_of_uri(ref)
        elif parsed[0] == "model":
            shape = self._shape_of_uri(self.workflow.model.base)
            declared = self.workflow.model.parameters
            # A declared count beats a guess from the model's name (but not a real config.json).
            if declared and (shape is None or shape.source == "name"):
                shape = ModelShape(declared, source="declared")
        else:
            up = self.workflow.stage(parsed[0])
            inputs = up.refs()
            first = next(iter(inputs.values()), None)
            shape = self.shape_of(first) if first else None
        self._shapes[ref] = shape
        return shape

    def _shape_of_uri(self, uri: str) -> ModelShape | None:
        try:
            parsed = parse_uri(uri, self.loaded.base_dir)
        except UriError:
            return None
        if parsed.scheme == "builtin":
            src = self.registry.model(parsed.target)
            return ModelShape(src.parameters, source="builtin") if src else None
        if parsed.scheme == "local":
            return shape_from_dir(Path(parsed.target))
        return shape_from_name(parsed.target)

    def _unpinned(self, stage: StageBase) -> list[str]:
        """hf:// models without @REVISION: new commits on the branch are invisible to the cache."""
        warnings = []
        for ref in stage.refs().values():
            parsed = parse_ref(ref)
            uri = ref if parsed is None else self.workflow.model.base if parsed[0] == "model" else None
            if uri and uri.startswith("hf://") and "@" not in uri:
                warnings.append(
                    f"{uri} is not pinned: the cache cannot see new commits on its branch; "
                    f"use {uri}@REVISION for reproducible runs"
                )
        return warnings

    def _estimate(self, stage: StageBase, sp: StagePlan) -> None:
        refs = stage.refs()
        first = next(iter(refs.values()), None)
        shape = self.shape_of(first) if first else None
        sp.shape = shape
        if shape is None:
            if first is not None:
                sp.warnings.append("model size unknown: set model.parameters for estimates")
            return
        hook = sp.operator.load_estimate() if sp.operator else None
        if hook is None:
            return
        res = self.workflow.resources
        est: StageEstimate | None = hook(stage, shape, EstimateInputs(res.device, self.loaded.dataset_path))
        if est is None:
            return
        sp.memory, sp.tokens, sp.flops = est.memory, est.tokens, est.flops
        if est.flops is not None:
            sp.gpu_hours = gpu_hours(est.flops, res.gpu_tflops, res.mfu)

    def _describe(self, stage: StageBase, sp: StagePlan) -> None:
        """The operator's own account of what it would launch; its ValueError blocks the run."""
        hook = sp.operator.load_describe() if sp.operator else None
        if hook is None:
            return
        try:
            sp.launch = hook(stage, self.workflow)
        except ValueError as e:
            sp.problems.append(self.loaded.source.problem(f"stages[{sp.index}]", str(e)))

    def _check(self, stage: StageBase, sp: StagePlan, host_mem: int) -> None:
        at = f"stages[{sp.index}]"
        src = self.loaded.source
        res = self.workflow.resources
        op = sp.operator
        if op is None:
            installed = sorted(
                {f"{o.kind}" + (f"/{o.backend}" if o.backend else "") for o in self.registry.operators()}
            )
            what = f"kind {sp.kind!r}" + (f" with backend {sp.backend!r}" if sp.backend else "")
            sp.problems.append(
                src.problem(
                    f"{at}.kind",
                    f"operator not installed for {what}",
                    f"installed: {', '.join(installed) or 'none'}",
                )
            )
            return
        caps = op.capabilities
        label = sp.kind + (f" ({sp.backend})" if sp.backend else "")  # not "evaluate (None)"
        if res.device == "cpu" and caps.requires_gpu:
            sp.problems.append(src.problem(f"{at}.kind", f"{label} needs a GPU", "set resources.device: gpu"))
        if res.device == "gpu" and not caps.gpu:
            sp.problems.append(src.problem(f"{at}.kind", f"{label} does not run on GPUs"))
        hook = op.load_check()
        for issue in hook(stage, self.workflow, caps) if hook else []:
            if issue.warning:
                sp.warnings.append(issue.message)
            else:
                where = f"{at}.{issue.field}" if issue.field else at
                sp.problems.append(src.problem(where, issue.message, issue.hint))
        if sp.memory is not None:
            need = sp.memory.per_device_bytes
            if sp.gpus > 0 and need > res.gpu_memory_gb * GiB:
                sp.problems.append(
                    src.problem(
                        at,
                        f"needs ~{need / GiB:.1f} GiB per GPU, more than gpu_memory_gb={res.gpu_memory_gb:g}",
                        "use qlora/lora, gradient_checkpointing, a smaller micro_batch_size or more tp/pp",
                    )
                )
            elif sp.gpus == 0 and need > host_mem:
                sp.problems.append(
                    src.problem(
                        at, f"needs ~{need / GiB:.1f} GiB of host memory; {host_mem / GiB:.1f} GiB available"
                    )
                )


def _host_memory_bytes(workflow: Workflow) -> int:
    if workflow.resources.memory_gb:
        return int(workflow.resources.memory_gb * GiB)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * GiB


def _kind(stage: StageBase) -> str:
    return str(getattr(stage, "kind"))  # noqa: B009 - every concrete stage has a Literal kind


def build_plan(
    loaded: LoadedWorkflow,
    registry: OperatorRegistry,
    models: ModelStore,
    store: StageStore,
    use_cache: bool = True,
) -> Plan:
    return Planner(loaded, registry, models, store).build(use_cache=use_cache)


__all__ = ["BASE_MODEL_REF", "Plan", "Planner", "StagePlan", "build_plan", "topological_order"]
