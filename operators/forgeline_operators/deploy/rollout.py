"""The ``ModelEndpoint`` rollout state machine, pure: from the endpoint's spec, its last status, the
children that exist (per revision: desired and ready replicas), the canary's gate measurements and the
time, decide what to apply, what to delete, the next status and when to look again. No kopf, no client:
:mod:`forgeline_operators.deploy.controller` reads the inputs and carries out the :class:`Plan`. A plan
names revisions and splits, not manifests: the controller renders them with
:mod:`forgeline_operators.deploy.manifests`. ``canaryRevision`` is the revision being rolled out, whatever
the strategy (``canaryStep`` stays null outside a canary).

A revision that is not ready within ``PROGRESS_DEADLINE_S`` is given up: rolled back (``Degraded``) when
another revision serves, ``Failed`` (still retried) when it is the first one.

Everything the machine needs to continue lives in the status (``currentRevision``, ``canaryRevision``,
``canaryStep``, ``stepStartedAt``, ``trafficSplit``), so an operator restarted mid-rollout resumes at the
same step. Strategies:

- first revision (no ``currentRevision``): deploy it; when ready, point the stable Service and the route
  at it (no canary: there is nothing to compare against).
- ``rolling``: deploy the new revision at full size next to the current one; when ready, switch the
  stable Service and 100 % of the route, then delete the old revision's children.
- ``canary``: deploy the new revision within the GPU surge budget (``min(replicas, maxSurgeGpus //
  gpus)``, at least 1); when ready, route ``steps[0]`` % to it; after each ``stepIntervalSeconds``
  check the gates on the canary's own metrics: pass moves to the next step, and reaching the last
  step (100) promotes (canary scaled to full size, then switched as in ``rolling``); a failure rolls
  back (100 % to the current revision, canary children deleted, phase ``Degraded``, the numbers in
  ``rollbackReason``). A rolled-back revision is not retried until ``metadata.generation`` changes.

``observedGeneration`` is the generation last acted on; conditions move their ``lastTransitionTime``
only when their status flips (:func:`forgeline_operators.lib.kube_conditions.set_condition`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Literal

from forgeline_operators.deploy.resources import (
    GateResult,
    ModelEndpointSpec,
    ModelEndpointStatus,
    revision_of,
)
from forgeline_operators.lib.kube_conditions import Condition, set_condition

__all__ = [
    "ApplyRevision",
    "ApplyRoute",
    "GateMetrics",
    "Observed",
    "Plan",
    "canary_replicas",
    "gate_due",
    "judge",
    "reconcile",
    "rfc3339",
]

# How often to look again while waiting for replicas (the controller is also woken by child events).
POLL_S = 5.0
# How long a revision may take to become ready (image pull, model copy, engine load: Triton's startup
# probe allows 30 min) before the rollout gives up on it.
PROGRESS_DEADLINE_S = 2400.0


@dataclass(frozen=True)
class Observed:
    """One revision's Deployment as read from the server."""

    desired: int
    ready: int


@dataclass(frozen=True)
class GateMetrics:
    """What the canary revision measured during its step (from its pods or Prometheus)."""

    requests: float
    p95_ttft_ms: float | None
    error_rate: float | None
    error: str | None = None  # why nothing could be read (the gate then fails closed, saying so)


@dataclass(frozen=True)
class ApplyRevision:
    """Apply revision ``revision``'s children (Deployment, Service, HPA, PDB / NIMService) at ``replicas``."""

    revision: str
    replicas: int


@dataclass(frozen=True)
class ApplyRoute:
    """Apply the stable Service (selecting ``stable``) and the HTTPRoute with weights ``split``."""

    stable: str
    split: dict[str, int]


@dataclass
class Plan:
    """What to do now: ``apply`` and ``delete`` (revisions whose children go), the new status, and when to
    reconcile again (None: only on the next event)."""

    status: ModelEndpointStatus
    apply_revisions: list[ApplyRevision] = field(default_factory=list)
    route: ApplyRoute | None = None
    delete_revisions: list[str] = field(default_factory=list)
    requeue_after_s: float | None = None


def rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(s: str) -> datetime.datetime:
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def canary_replicas(spec: ModelEndpointSpec) -> int:
    """Replicas of a canary within the surge budget: ``min(replicas, maxSurgeGpus // gpus)``, at least 1."""
    k = spec.kubernetes
    if k.gpus == 0:  # no GPUs, no GPU budget to respect: one replica is enough to observe
        return 1
    budget = spec.rollout.max_surge_gpus or k.gpus
    return max(1, min(k.replicas, budget // k.gpus))


def _ready(observed: dict[str, Observed], revision: str, replicas: int) -> bool:
    o = observed.get(revision)
    return o is not None and o.desired >= replicas and o.ready >= replicas


def gate_due(spec: ModelEndpointSpec, status: ModelEndpointStatus, now: datetime.datetime) -> bool:
    """Whether the next :func:`reconcile` judges the canary's gates (so the controller reads metrics)."""
    if status.canary_step is None or status.step_started_at is None:
        return False
    if status.canary_step >= len(spec.rollout.steps) - 1:  # promoting: no more gates
        return False
    return (now - _parse(status.step_started_at)).total_seconds() >= spec.rollout.step_interval_s


def judge(spec: ModelEndpointSpec, step: int, m: GateMetrics | None, now: datetime.datetime) -> GateResult:
    """The gate verdict of a canary step: every configured gate must hold on a measurement with requests."""
    g = spec.rollout.gates
    at = rfc3339(now)
    if g.p95_ttft_ms is None and g.error_rate is None:
        return GateResult(step=step, passed=True, reason="no gates configured", at=at)
    if m is not None and m.error:
        return GateResult(
            step=step, passed=False, at=at, reason=f"cannot read the canary's metrics: {m.error}"
        )
    if m is None or m.requests <= 0:
        return GateResult(
            step=step, passed=False, at=at,
            reason=f"no requests reached the canary during step {step} (cannot check gates)",
        )  # fmt: skip
    failed = []
    if g.p95_ttft_ms is not None and (m.p95_ttft_ms is None or m.p95_ttft_ms > g.p95_ttft_ms):
        failed.append(f"p95 TTFT {_num(m.p95_ttft_ms)} ms > {g.p95_ttft_ms:g} ms")
    if g.error_rate is not None and (m.error_rate is None or m.error_rate > g.error_rate):
        failed.append(f"error rate {_num(m.error_rate)} > {g.error_rate:g}")
    reason = "; ".join(failed) if failed else f"gates held over {m.requests:g} requests"
    return GateResult(
        step=step, p95_ttft_ms=m.p95_ttft_ms, error_rate=m.error_rate, passed=not failed, reason=reason, at=at
    )


def _num(v: float | None) -> str:
    return "unmeasured" if v is None else f"{v:.4g}"


Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


def _with(
    status: ModelEndpointStatus,
    gen: int,
    phase: Phase,
    reason: str,
    message: str,
    now: datetime.datetime,
    **kw: object,
) -> ModelEndpointStatus:
    """``status`` updated to ``phase`` with its three conditions derived from it."""
    t = rfc3339(now)
    serving = (kw.get("current_revision", status.current_revision)) is not None

    def cond(type_: str, on: bool, r: str, msg: str) -> Condition:
        return Condition(
            type=type_, status="True" if on else "False", reason=r, message=msg,
            last_transition_time=t, observed_generation=gen,
        )  # fmt: skip

    degraded = phase == "Degraded"
    conds = list(status.conditions)
    conds = set_condition(conds, cond("Ready", serving, "Serving" if serving else "NotServing", message))
    conds = set_condition(conds, cond("Progressing", phase == "Progressing", reason, message))
    conds = set_condition(conds, cond("Degraded", degraded, reason if degraded else "AsExpected", message))
    return status.model_copy(update={"phase": phase, "observed_generation": gen, "conditions": conds, **kw})


def reconcile(
    name: str,
    namespace: str,
    generation: int,
    spec: ModelEndpointSpec,
    status: ModelEndpointStatus,
    observed: dict[str, Observed],
    metrics: GateMetrics | None,
    now: datetime.datetime,
    port: int = 8000,
) -> Plan:
    """The next :class:`Plan` for endpoint ``namespace/name`` (see the module docstring for the rules)."""
    rev = revision_of(spec)
    replicas = spec.kubernetes.replicas
    cur = status.current_revision
    revisions = {**status.revisions, rev: spec.model.uri}
    url = f"http://{name}.{namespace}.svc.cluster.local:{port}"

    # A canary of an older spec is abandoned when a different revision is wanted now.
    if status.canary_revision is not None and status.canary_revision != rev:
        old = status.canary_revision
        status = status.model_copy(
            update={"canary_revision": None, "canary_step": None, "step_started_at": None}
        )
        plan = reconcile(name, namespace, generation, spec, status, observed, metrics, now, port)
        if old != plan.status.current_revision and old not in plan.delete_revisions:
            plan.delete_revisions.append(old)
        if cur is not None and plan.route is None:
            plan.route = ApplyRoute(cur, {cur: 100})
        return plan

    # 1. First revision, or the current one (steady state, scaling, recovery of replicas).
    if cur is None or cur == rev:
        apply = [ApplyRevision(rev, replicas)]
        if not _ready(observed, rev, replicas):
            msg = f"waiting for revision {rev}: {_counts(observed, rev, replicas)}"
            if cur is not None:  # scaling the serving revision: it serves meanwhile, no deadline
                st = _with(
                    status, generation, "Progressing", "WaitingForReplicas", msg, now, revisions=revisions
                )
                return Plan(st, apply, None, [], POLL_S)
            since = _since(status, rev, now)
            waited = _overdue(since, now)
            phase: Phase = "Failed" if waited else "Progressing"
            reason = "ProgressDeadlineExceeded" if waited else "WaitingForReplicas"
            msg += f" after {waited:.0f} s (still trying)" if waited else ""
            st = _with(
                status, generation, phase, reason, msg, now,
                canary_revision=rev, step_started_at=since, revisions=revisions,
            )  # fmt: skip
            return Plan(st, apply, None, [], POLL_S)
        stale = sorted(r for r in observed if r != rev)
        st = _with(
            status, generation, "Ready", "RolloutComplete", f"revision {rev} serves 100 %", now,
            current_revision=rev, canary_revision=None, canary_step=None, step_started_at=None,
            traffic_split={rev: 100}, url=url, model_version=spec.model.version, revisions=revisions,
            rollback_reason=status.rollback_reason if cur == rev else None,
        )  # fmt: skip
        return Plan(st, apply, ApplyRoute(rev, {rev: 100}), stale, None)

    # 2. A revision rolled back under this generation is not retried until the spec changes.
    if (
        status.phase == "Degraded"
        and status.observed_generation == generation
        and status.canary_revision is None
    ):
        st = _with(
            status, generation, "Degraded", "RolledBack", status.rollback_reason or "rolled back", now,
            traffic_split={cur: 100},
        )  # fmt: skip
        return Plan(st, [], ApplyRoute(cur, {cur: 100}), [rev] if rev in observed else [], None)

    if spec.rollout.strategy == "rolling":
        return _promote(generation, spec, status, observed, now, rev, cur, revisions, url, "RollingUpdate")
    return _canary(generation, spec, status, observed, metrics, now, rev, cur, revisions, url)


def _since(status: ModelEndpointStatus, rev: str, now: datetime.datetime) -> str:
    """When the wait for ``rev`` began: kept while the same revision is being rolled out, else now."""
    if status.canary_revision == rev and status.step_started_at:
        return status.step_started_at
    return rfc3339(now)


def _overdue(since: str, now: datetime.datetime) -> float | None:
    waited = (now - _parse(since)).total_seconds()
    return waited if waited > PROGRESS_DEADLINE_S else None


def _give_up(
    generation: int, status: ModelEndpointStatus, now: datetime.datetime, rev: str, cur: str,
    revisions: dict[str, str], why: str,
) -> Plan:  # fmt: skip
    """Roll back to ``cur``: the new revision's children go, 100 % to ``cur``, phase Degraded."""
    st = _with(
        status, generation, "Degraded", "ProgressDeadlineExceeded", why, now,
        canary_revision=None, canary_step=None, step_started_at=None, traffic_split={cur: 100},
        rollback_reason=why, revisions=revisions,
    )  # fmt: skip
    return Plan(st, [], ApplyRoute(cur, {cur: 100}), [rev], None)


def _counts(observed: dict[str, Observed], rev: str, want: int) -> str:
    o = observed.get(rev)
    return f"{o.ready if o else 0}/{want} replicas ready"


def _promote(
    generation: int, spec: ModelEndpointSpec, status: ModelEndpointStatus, observed: dict[str, Observed],
    now: datetime.datetime, rev: str, cur: str, revisions: dict[str, str], url: str, how: str,
) -> Plan:  # fmt: skip
    """Full-size ``rev`` next to ``cur``; once ready, switch everything to it and delete ``cur``."""
    replicas = spec.kubernetes.replicas
    apply = [ApplyRevision(rev, replicas)]
    if not _ready(observed, rev, replicas):
        since = _since(status, rev, now)
        waited = _overdue(since, now)
        if waited:
            counts = _counts(observed, rev, replicas)
            why = f"revision {rev} not ready after {waited:.0f} s ({counts}); rolled back"
            return _give_up(generation, status, now, rev, cur, revisions, why)
        msg = f"{how}: revision {rev} {_counts(observed, rev, replicas)}; {cur} serves"
        st = _with(
            status, generation, "Progressing", how, msg, now,
            canary_revision=rev, step_started_at=since, revisions=revisions,
        )  # fmt: skip
        return Plan(st, apply, None, [], POLL_S)
    st = _with(
        status, generation, "Ready", "RolloutComplete", f"revision {rev} serves 100 % (was {cur})", now,
        current_revision=rev, canary_revision=None, canary_step=None, step_started_at=None,
        traffic_split={rev: 100}, url=url, model_version=spec.model.version, revisions=revisions,
        rollback_reason=None,
    )  # fmt: skip
    return Plan(st, apply, ApplyRoute(rev, {rev: 100}), sorted(r for r in observed if r != rev), None)


def _canary(
    generation: int, spec: ModelEndpointSpec, status: ModelEndpointStatus, observed: dict[str, Observed],
    metrics: GateMetrics | None, now: datetime.datetime, rev: str, cur: str, revisions: dict[str, str],
    url: str,
) -> Plan:  # fmt: skip
    steps = spec.rollout.steps
    last = len(steps) - 1
    step = status.canary_step if status.canary_revision == rev else None
    if step is not None and step >= last:
        status = status.model_copy(update={"canary_revision": rev, "canary_step": last})
        return _promote(generation, spec, status, observed, now, rev, cur, revisions, url, "Promoting")
    n = canary_replicas(spec)
    apply = [ApplyRevision(rev, n)]
    if step is None:  # deploying the canary; traffic moves only once it is ready
        if not _ready(observed, rev, n):
            since = _since(status, rev, now)
            waited = _overdue(since, now)
            if waited:
                why = (
                    f"canary {rev} not ready after {waited:.0f} s ({_counts(observed, rev, n)}); rolled back"
                )
                return _give_up(generation, status, now, rev, cur, revisions, why)
            msg = f"canary {rev}: {_counts(observed, rev, n)}; {cur} serves 100 %"
            st = _with(
                status, generation, "Progressing", "CanaryDeploying", msg, now,
                canary_revision=rev, canary_step=None, step_started_at=since, revisions=revisions,
                traffic_split={cur: 100},
            )  # fmt: skip
            return Plan(st, apply, ApplyRoute(cur, {cur: 100}), [], POLL_S)
        if last == 0:  # steps [100]: nothing to observe, promote straight away
            st = status.model_copy(
                update={"canary_revision": rev, "canary_step": 0, "step_started_at": rfc3339(now)}
            )
            return _promote(generation, spec, st, observed, now, rev, cur, revisions, url, "Promoting")
        return _enter_step(generation, spec, status, now, rev, cur, revisions, 0, apply)

    started = _parse(status.step_started_at) if status.step_started_at else now
    wait = spec.rollout.step_interval_s - (now - started).total_seconds()
    split = _split(cur, rev, steps[step])
    if wait > 0:
        msg = f"canary {rev} at {steps[step]} % (step {step + 1}/{len(steps)}), gates checked in {wait:.0f} s"
        st = _with(
            status,
            generation,
            "Progressing",
            "CanaryStep",
            msg,
            now,
            traffic_split=split,
            revisions=revisions,
        )
        return Plan(st, apply, ApplyRoute(cur, split), [], wait)
    verdict = judge(spec, step, metrics, now)
    if not verdict.passed:
        reason = f"canary {rev} failed its gates at {steps[step]} % (step {step + 1}): {verdict.reason}"
        st = _with(
            status, generation, "Degraded", "GateFailed", reason, now,
            canary_revision=None, canary_step=None, step_started_at=None, traffic_split={cur: 100},
            last_gate=verdict, rollback_reason=reason, revisions=revisions,
        )  # fmt: skip
        return Plan(st, [], ApplyRoute(cur, {cur: 100}), [rev], None)
    status = status.model_copy(update={"last_gate": verdict})
    if step + 1 >= last:
        st = status.model_copy(
            update={"canary_revision": rev, "canary_step": last, "step_started_at": rfc3339(now)}
        )
        return _promote(generation, spec, st, observed, now, rev, cur, revisions, url, "Promoting")
    return _enter_step(generation, spec, status, now, rev, cur, revisions, step + 1, apply)


def _split(cur: str, rev: str, pct: int) -> dict[str, int]:
    return {cur: 100 - pct, rev: pct}


def _enter_step(
    generation: int, spec: ModelEndpointSpec, status: ModelEndpointStatus, now: datetime.datetime,
    rev: str, cur: str, revisions: dict[str, str], step: int, apply: list[ApplyRevision],
) -> Plan:  # fmt: skip
    steps = spec.rollout.steps
    split = _split(cur, rev, steps[step])
    msg = f"canary {rev} at {steps[step]} % (step {step + 1}/{len(steps)})"
    st = _with(
        status, generation, "Progressing", "CanaryStep", msg, now,
        canary_revision=rev, canary_step=step, step_started_at=rfc3339(now), traffic_split=split,
        revisions=revisions,
    )  # fmt: skip
    return Plan(st, apply, ApplyRoute(cur, split), [], float(spec.rollout.step_interval_s))
