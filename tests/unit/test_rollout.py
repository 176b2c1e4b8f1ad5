"""The ModelEndpoint rollout state machine (deploy/rollout.py): every transition, driven step by step as
the controller would (status fed back in, children as a fake cluster reports them)."""

from __future__ import annotations

import datetime

from forgeline_operators.deploy.resources import ModelEndpointSpec, ModelEndpointStatus, revision_of
from forgeline_operators.deploy.rollout import (
    PROGRESS_DEADLINE_S,
    GateMetrics,
    Observed,
    Plan,
    canary_replicas,
    gate_due,
    reconcile,
)

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def spec(uri: str = "s3://m/v1", **rollout: object) -> ModelEndpointSpec:
    kube = {"replicas": 3, "gpus": 2}
    return ModelEndpointSpec.model_validate({"model": {"uri": uri}, "rollout": rollout, "kubernetes": kube})


class World:
    """Children as a cluster would report them: Deployments exist once applied, ready when told."""

    def __init__(self) -> None:
        self.observed: dict[str, Observed] = {}
        self.status = ModelEndpointStatus()
        self.route: tuple[str, dict[str, int]] | None = None

    def step(
        self, s: ModelEndpointSpec, gen: int, now: datetime.datetime, metrics: GateMetrics | None = None
    ) -> Plan:
        plan = reconcile("ep", "ns", gen, s, self.status, self.observed, metrics, now)
        for a in plan.apply_revisions:
            o = self.observed.get(a.revision)
            self.observed[a.revision] = Observed(
                desired=a.replicas, ready=min(o.ready if o else 0, a.replicas)
            )
        for r in plan.delete_revisions:
            self.observed.pop(r, None)
        if plan.route:
            self.route = (plan.route.stable, plan.route.split)
        self.status = plan.status
        return plan

    def make_ready(self) -> None:
        self.observed = {r: Observed(o.desired, o.desired) for r, o in self.observed.items()}


def cond(st: ModelEndpointStatus, type_: str) -> tuple[str, str | None]:
    c = next(c for c in st.conditions if c.type == type_)
    return c.status, c.last_transition_time


def ready_world(s: ModelEndpointSpec) -> World:
    w = World()
    w.step(s, 1, T0)
    w.make_ready()
    w.step(s, 1, T0)
    return w


def test_create_waits_for_replicas_then_ready() -> None:
    s = spec()
    w = World()
    p = w.step(s, 1, T0)
    rev = revision_of(s)
    assert p.status.phase == "Progressing" and p.route is None and p.requeue_after_s
    assert [(a.revision, a.replicas) for a in p.apply_revisions] == [(rev, 3)]
    assert cond(p.status, "Ready")[0] == "False" and p.status.observed_generation == 1
    w.make_ready()
    p = w.step(s, 1, T0 + datetime.timedelta(seconds=5))
    assert p.status.phase == "Ready" and p.status.current_revision == rev
    assert w.route == (rev, {rev: 100}) and p.status.traffic_split == {rev: 100}
    assert p.status.url == "http://ep.ns.svc.cluster.local:8000" and p.status.revisions == {rev: "s3://m/v1"}
    assert cond(p.status, "Ready") == ("True", "2026-01-01T00:00:05Z")
    # Steady state: nothing flips, so no transition time moves.
    p = w.step(s, 1, T0 + datetime.timedelta(seconds=60))
    assert cond(p.status, "Ready") == ("True", "2026-01-01T00:00:05Z") and p.delete_revisions == []


def test_rolling_update_switches_when_ready_then_deletes_old() -> None:
    s1, s2 = spec(), spec("s3://m/v2")
    w = ready_world(s1)
    r1, r2 = revision_of(s1), revision_of(s2)
    p = w.step(s2, 2, T0)
    assert p.status.phase == "Progressing" and p.status.current_revision == r1
    assert [(a.revision, a.replicas) for a in p.apply_revisions] == [(r2, 3)] and p.route is None
    assert p.status.observed_generation == 2 and cond(p.status, "Progressing")[0] == "True"
    w.make_ready()
    p = w.step(s2, 2, T0)
    assert p.status.phase == "Ready" and p.status.current_revision == r2 and p.delete_revisions == [r1]
    assert w.route == (r2, {r2: 100}) and set(w.observed) == {r2}
    assert p.status.revisions == {r1: "s3://m/v1", r2: "s3://m/v2"}


def test_scaling_is_not_a_rollout() -> None:
    s = spec()
    w = ready_world(s)
    bigger = s.model_copy(update={"kubernetes": s.kubernetes.model_copy(update={"replicas": 5})})
    p = w.step(bigger, 2, T0)
    assert revision_of(bigger) == revision_of(s)
    assert [(a.revision, a.replicas) for a in p.apply_revisions] == [(revision_of(s), 5)]
    assert p.status.phase == "Progressing" and p.status.current_revision == revision_of(s)


def test_canary_replicas_respect_gpu_surge_budget() -> None:
    assert canary_replicas(spec(strategy="canary")) == 1  # budget = one replica's 2 GPUs
    assert canary_replicas(spec(strategy="canary", max_surge_gpus=4)) == 2
    assert canary_replicas(spec(strategy="canary", max_surge_gpus=100)) == 3  # never above replicas
    assert canary_replicas(spec(strategy="canary", max_surge_gpus=1)) == 1  # at least one


def canary_spec(uri: str = "s3://m/v2") -> ModelEndpointSpec:
    return spec(uri, strategy="canary", steps=[10, 50, 100], step_interval_s=30,
                gates={"p95_ttft_ms": 200, "error_rate": 0.01})  # fmt: skip


GOOD = GateMetrics(requests=120, p95_ttft_ms=150.0, error_rate=0.0)


def test_canary_steps_through_gates_and_promotes() -> None:
    w = ready_world(spec())
    s = canary_spec()
    r1, r2 = revision_of(spec()), revision_of(s)
    p = w.step(s, 2, T0)
    assert p.status.canary_revision == r2 and p.status.canary_step is None
    assert [(a.revision, a.replicas) for a in p.apply_revisions] == [(r2, 1)] and w.route == (r1, {r1: 100})
    w.make_ready()
    p = w.step(s, 2, T0)
    assert p.status.canary_step == 0 and w.route == (r1, {r1: 90, r2: 10}) and p.requeue_after_s == 30
    assert p.status.step_started_at == "2026-01-01T00:00:00Z"
    assert not gate_due(s, w.status, T0 + datetime.timedelta(seconds=29))
    p = w.step(s, 2, T0 + datetime.timedelta(seconds=10))  # mid-window: wait the rest
    assert p.status.canary_step == 0 and p.requeue_after_s == 20
    t = T0 + datetime.timedelta(seconds=30)
    assert gate_due(s, w.status, t)
    p = w.step(s, 2, t, GOOD)
    assert p.status.canary_step == 1 and w.route == (r1, {r1: 50, r2: 50})
    assert (
        p.status.last_gate is not None and p.status.last_gate.passed and p.status.last_gate.p95_ttft_ms == 150
    )
    t += datetime.timedelta(seconds=30)
    p = w.step(s, 2, t, GOOD)  # passing the step before 100 % promotes: full size first
    assert p.status.canary_step == 2 and p.status.phase == "Progressing"
    assert [(a.revision, a.replicas) for a in p.apply_revisions] == [(r2, 3)]
    assert not gate_due(s, w.status, t + datetime.timedelta(hours=1))
    w.make_ready()
    p = w.step(s, 2, t)
    assert p.status.phase == "Ready" and p.status.current_revision == r2 and p.status.canary_revision is None
    assert p.delete_revisions == [r1] and w.route == (r2, {r2: 100}) and set(w.observed) == {r2}


def test_canary_gate_failure_rolls_back_and_is_not_retried() -> None:
    w = ready_world(spec())
    s = canary_spec()
    r1, r2 = revision_of(spec()), revision_of(s)
    w.step(s, 2, T0)
    w.make_ready()
    w.step(s, 2, T0)
    bad = GateMetrics(requests=80, p95_ttft_ms=350.0, error_rate=0.05)
    p = w.step(s, 2, T0 + datetime.timedelta(seconds=31), bad)
    assert p.status.phase == "Degraded" and p.delete_revisions == [r2] and w.route == (r1, {r1: 100})
    assert p.status.current_revision == r1 and p.status.canary_revision is None
    assert p.status.rollback_reason is not None
    assert (
        "p95 TTFT 350 ms > 200 ms" in p.status.rollback_reason
        and "error rate 0.05 > 0.01" in p.status.rollback_reason
    )
    assert cond(p.status, "Degraded")[0] == "True" and cond(p.status, "Ready")[0] == "True"
    assert p.status.last_gate is not None and not p.status.last_gate.passed
    # Same generation: the failed revision stays off.
    p = w.step(s, 2, T0 + datetime.timedelta(minutes=5))
    assert p.status.phase == "Degraded" and p.apply_revisions == [] and set(w.observed) == {r1}
    assert cond(p.status, "Degraded")[1] == "2026-01-01T00:00:31Z"
    # A new generation retries.
    p = w.step(s, 3, T0 + datetime.timedelta(minutes=6))
    assert p.status.phase == "Progressing" and p.status.canary_revision == r2
    assert cond(p.status, "Degraded")[0] == "False"


def test_canary_without_requests_fails_closed() -> None:
    w = ready_world(spec())
    s = canary_spec()
    w.step(s, 2, T0)
    w.make_ready()
    w.step(s, 2, T0)
    p = w.step(
        s, 2, T0 + datetime.timedelta(seconds=30), GateMetrics(requests=0, p95_ttft_ms=None, error_rate=None)
    )
    assert p.status.phase == "Degraded" and "no requests reached the canary" in (
        p.status.rollback_reason or ""
    )


def test_restart_mid_rollout_resumes_from_status_alone() -> None:
    w = ready_world(spec())
    s = canary_spec()
    w.step(s, 2, T0)
    w.make_ready()
    w.step(s, 2, T0)
    w.step(s, 2, T0 + datetime.timedelta(seconds=30), GOOD)  # now at step 1 (50 %)
    # A new operator: only the stored status (round-tripped through its wire form) and the cluster.
    from forgeline_operators.lib.kube_crd import from_wire, to_wire

    stored = from_wire(ModelEndpointStatus, to_wire(w.status))
    assert stored == w.status
    p = reconcile("ep", "ns", 2, s, stored, dict(w.observed), None, T0 + datetime.timedelta(seconds=45))
    assert p.status.canary_step == 1 and p.requeue_after_s == 15 and p.route is not None
    assert p.route.split == {revision_of(spec()): 50, revision_of(s): 50} and p.delete_revisions == []


def test_spec_change_mid_canary_abandons_it() -> None:
    w = ready_world(spec())
    s2, s3 = canary_spec(), canary_spec("s3://m/v3")
    w.step(s2, 2, T0)
    w.make_ready()
    w.step(s2, 2, T0)
    p = w.step(s3, 3, T0 + datetime.timedelta(seconds=5))
    assert revision_of(s2) in p.delete_revisions and p.status.canary_revision == revision_of(s3)
    assert p.status.canary_step is None and w.route == (revision_of(spec()), {revision_of(spec()): 100})
    # Reverting to the serving spec mid-canary also drops the canary.
    p = w.step(spec(), 4, T0 + datetime.timedelta(seconds=6))
    assert p.status.phase == "Ready" and revision_of(s3) in p.delete_revisions


def test_single_step_canary_promotes_once_ready() -> None:
    w = ready_world(spec())
    s = spec("s3://m/v2", strategy="canary", steps=[100])
    w.step(s, 2, T0)
    w.make_ready()
    p = w.step(s, 2, T0)
    assert p.status.canary_step == 0 and [(a.revision, a.replicas) for a in p.apply_revisions] == [
        (revision_of(s), 3)
    ]
    w.make_ready()
    assert w.step(s, 2, T0).status.phase == "Ready"


LATE = datetime.timedelta(seconds=PROGRESS_DEADLINE_S + 1)


def test_first_revision_past_deadline_is_failed_then_recovers() -> None:
    s = spec()
    w = World()
    w.step(s, 1, T0)
    p = w.step(s, 1, T0 + datetime.timedelta(seconds=30))
    assert p.status.phase == "Progressing" and p.status.step_started_at == "2026-01-01T00:00:00Z"
    p = w.step(s, 1, T0 + LATE)
    assert p.status.phase == "Failed" and cond(p.status, "Ready")[0] == "False"
    progressing = next(c for c in p.status.conditions if c.type == "Progressing")
    assert (
        progressing.reason == "ProgressDeadlineExceeded"
        and "0/3 replicas ready after 2401 s" in progressing.message
    )
    assert p.apply_revisions and p.requeue_after_s  # still trying
    w.make_ready()
    p = w.step(s, 1, T0 + LATE)
    assert p.status.phase == "Ready" and p.status.canary_revision is None and p.status.step_started_at is None


def test_rolling_revision_never_ready_is_rolled_back() -> None:
    w = ready_world(spec())
    s2 = spec("s3://m/v2")
    r1, r2 = revision_of(spec()), revision_of(s2)
    p = w.step(s2, 2, T0)
    assert p.status.canary_revision == r2 and p.status.step_started_at == "2026-01-01T00:00:00Z"
    p = w.step(s2, 2, T0 + LATE)
    assert p.status.phase == "Degraded" and p.delete_revisions == [r2] and w.route == (r1, {r1: 100})
    assert "not ready after 2401 s (0/3 replicas ready)" in (p.status.rollback_reason or "")
    assert w.step(s2, 2, T0 + LATE * 2).status.phase == "Degraded"  # not retried under this generation


def test_canary_never_ready_is_rolled_back() -> None:
    w = ready_world(spec())
    s = canary_spec()
    w.step(s, 2, T0)
    p = w.step(s, 2, T0 + LATE)
    assert p.status.phase == "Degraded" and p.delete_revisions == [revision_of(s)]
    assert "canary" in (p.status.rollback_reason or "") and cond(p.status, "Degraded")[0] == "True"


def test_spec_change_during_rolling_drops_the_unfinished_revision() -> None:
    w = ready_world(spec())
    s2, s3 = spec("s3://m/v2"), spec("s3://m/v3")
    w.step(s2, 2, T0)
    p = w.step(s3, 3, T0 + datetime.timedelta(seconds=5))
    assert p.delete_revisions == [revision_of(s2)] and p.status.canary_revision == revision_of(s3)
    assert p.status.step_started_at == "2026-01-01T00:00:05Z"  # the new revision's wait starts afresh
