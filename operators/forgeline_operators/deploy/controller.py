"""The ``ModelEndpoint`` controller (kopf), thin: each trigger reads the endpoint, its revisions'
Deployments and (when a canary step is due) the canary's gate metrics, asks the pure
:func:`.rollout.reconcile` what to do, then server-side applies the children it names (K1's builders in
:mod:`.manifests`, each owned by the endpoint so deleting it garbage-collects them), deletes the
revisions it drops and writes ``status``. Kinds the server does not serve (``autoscaling/v2`` HPA,
``policy/v1`` PDB, Gateway API ``HTTPRoute``, NIM's ``NIMService`` on an older or bare cluster) are
skipped by discovery and logged once; their manifests are validated offline instead.

Triggers: create / spec update / resume (a restarted operator continues from ``status``), every event of
a child Deployment (``forgeline.dev/endpoint`` label), and a resync thread (``FORGELINE_ENDPOINT_RESYNC_S``,
default 5 s) that moves canary steps on as their windows end (not a kopf timer, which would put a
finalizer on every endpoint).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from forgeline_operators.deploy import gate_metrics, manifests
from forgeline_operators.deploy.resources import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ModelEndpointSpec,
    ModelEndpointStatus,
    from_cr,
)
from forgeline_operators.deploy.rollout import GateMetrics, Observed, Plan, gate_due, reconcile
from forgeline_operators.lib.kube_client import Kube, connect
from forgeline_operators.lib.kube_crd import to_wire

__all__ = ["ENDPOINT_LABEL", "REVISION_LABEL", "merge_patch", "step"]

ENDPOINT_LABEL = "forgeline.dev/endpoint"
REVISION_LABEL = "forgeline.dev/revision"
TIMER_S = float(os.environ.get("FORGELINE_ENDPOINT_RESYNC_S", "5"))
SERVICE_PORT = 8000  # the stable Service's http port (manifests: Triton http, NIM api)
METRICS_PORT = 8002  # the pods' Prometheus port (manifests: Triton --metrics-port)
# Kinds a revision may own, deleted by label when the revision goes.
REVISION_KINDS = [
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("apps.nvidia.com/v1alpha1", "NIMService"),
]
_log = logging.getLogger("forgeline.operator.endpoint")
_state: dict[str, Any] = {}
# Deployment events, spec updates and the timer can fire for one endpoint at once: one reconcile at a
# time, each on a fresh read, keeps the rollout's status writes ordered.
_lock = threading.Lock()


def _kube() -> Kube:
    if "kube" not in _state:
        _state["kube"] = connect()
    return _state["kube"]


def _served(kube: Kube, obj: dict[str, Any]) -> bool:
    key = (obj["apiVersion"], obj["kind"])
    known: dict[tuple[str, str], bool] = _state.setdefault("served", {})
    if key not in known:
        known[key] = kube.has_api(*key)
        if not known[key]:
            _log.warning("the server does not serve %s %s: not applied (validated offline only)", *key)
    return known[key]


def _observed(kube: Kube, namespace: str, name: str) -> dict[str, Observed]:
    out = {}
    for d in kube.list("apps/v1", "Deployment", namespace, label_selector=f"{ENDPOINT_LABEL}={name}"):
        rev = d["metadata"]["labels"].get(REVISION_LABEL)
        if rev and not d["metadata"].get("deletionTimestamp"):
            st = d.get("status") or {}
            # Ready only counts once the Deployment controller has seen the latest spec.
            fresh = st.get("observedGeneration", 0) >= d["metadata"].get("generation", 0)
            out[rev] = Observed(
                desired=d["spec"].get("replicas", 0), ready=st.get("readyReplicas", 0) if fresh else 0
            )
    return out


def _metrics(
    kube: Kube, namespace: str, name: str, spec: ModelEndpointSpec, status: ModelEndpointStatus
) -> GateMetrics:
    child = f"{name}-{status.canary_revision}"
    try:
        if spec.kubernetes.metrics_url:
            window = spec.rollout.step_interval_s
            return gate_metrics.from_prometheus(spec.kubernetes.metrics_url, namespace, child, window)
        sel = f"{ENDPOINT_LABEL}={name},{REVISION_LABEL}={status.canary_revision}"
        return gate_metrics.scrape_revision(kube.api, namespace, sel, METRICS_PORT)
    except Exception as e:  # any failure to read is a gate that cannot pass; the rollout says why
        _log.warning("ModelEndpoint %s/%s: gate metrics unreadable: %s", namespace, name, e)
        return GateMetrics(requests=0, p95_ttft_ms=None, error_rate=None, error=f"{type(e).__name__}: {e}")


def _spec_of(body: dict[str, Any]) -> ModelEndpointSpec:
    """The spec with its namespace pinned to the endpoint's own: children live next to their owner."""
    spec, _ = from_cr(body)
    kube = spec.kubernetes.model_copy(update={"namespace": body["metadata"]["namespace"]})
    return spec.model_copy(update={"kubernetes": kube})


def _carry_out(kube: Kube, body: dict[str, Any], spec: ModelEndpointSpec, plan: Plan) -> None:
    meta = body["metadata"]
    name, owner = meta["name"], (meta["name"], meta["uid"])
    objs: list[dict[str, Any]] = []
    for a in plan.apply_revisions:
        objs += manifests.revision_children(name, spec, a.revision, a.replicas, owner=owner)
    if plan.route is not None:
        objs.append(manifests.stable_service(name, spec, plan.route.stable, owner=owner))
        objs.append(manifests.http_route(name, spec, plan.route.split, owner=owner))
    for obj in objs:
        if _served(kube, obj):
            kube.apply(obj)
    for rev in plan.delete_revisions:
        sel = f"{ENDPOINT_LABEL}={meta['name']},{REVISION_LABEL}={rev}"
        for api_version, kind in REVISION_KINDS:
            if _served(kube, {"apiVersion": api_version, "kind": kind}):
                for child in kube.list(api_version, kind, meta["namespace"], label_selector=sel):
                    kube.delete(api_version, kind, child["metadata"]["name"], meta["namespace"])


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new``: a merge patch keeps every key it
    does not name, at every depth (``trafficSplit`` losing a revision), so dropped keys are set to None."""
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        o = old.get(k)
        out[k] = merge_patch(o, v) if isinstance(v, dict) and isinstance(o, dict) else v
    return out


def step(kube: Kube, namespace: str, name: str, now: datetime.datetime | None = None) -> Plan | None:
    """Reconcile one ``ModelEndpoint`` once; returns the plan carried out (None: it is gone)."""
    with _lock:
        body = kube.get(API_VERSION, KIND, name, namespace)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        spec, status = _spec_of(body), from_cr(body)[1]
        now = now or datetime.datetime.now(datetime.UTC)
        metrics = _metrics(kube, namespace, name, spec, status) if gate_due(spec, status, now) else None
        observed = _observed(kube, namespace, name)
        gen = int(body["metadata"].get("generation", 1))
        plan = reconcile(name, namespace, gen, spec, status, observed, metrics, now, port=SERVICE_PORT)
        _carry_out(kube, body, spec, plan)
        new, old = to_wire(plan.status), body.get("status") or {}
        if new != old:
            kube.patch_status(body, merge_patch(old, new))
            if new.get("phase") != old.get("phase"):
                _log.info("ModelEndpoint %s/%s: %s", namespace, name, new.get("phase"))
        return plan


@kopf.on.startup()
def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler progress in annotations: the CRD's structural status schema has no `kopf` field.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="forgeline.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="forgeline.dev")
    settings.posting.level = logging.WARNING
    _state.clear()  # a (re)started operator reconnects and rediscovers the served APIs


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def _on_change(namespace: str | None, name: str, **_: Any) -> None:
    _known.add((namespace or "", name))
    step(_kube(), namespace or "", name)


@kopf.on.event("apps", "v1", "deployments", labels={ENDPOINT_LABEL: kopf.PRESENT})
def _on_deployment(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _known.add((namespace or "", labels[ENDPOINT_LABEL]))
    step(_kube(), namespace or "", labels[ENDPOINT_LABEL])


# Canary windows end with no Kubernetes event to react to, so a resync thread steps every endpoint this
# operator has seen. Not a kopf timer: kopf puts a finalizer on every resource a timer watches, and an
# endpoint then cannot be deleted while the operator is down -- finalizers are for external cleanup only,
# and a ModelEndpoint has none (its children are garbage-collected through owner references).
_known: set[tuple[str, str]] = set()
_resync: dict[str, Any] = {}


def _resync_loop(stop: threading.Event) -> None:
    while not stop.wait(TIMER_S):
        for namespace, name in sorted(_known):
            try:
                if step(_kube(), namespace, name) is None:
                    _known.discard((namespace, name))
            except Exception:  # one endpoint's trouble must not stop the others' rollouts
                _log.exception("resync of ModelEndpoint %s/%s failed", namespace, name)


@kopf.on.startup()
def _start_resync(**_: Any) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=_resync_loop, args=(stop,), name="forgeline-resync", daemon=True)
    _resync.update(stop=stop, thread=thread)
    thread.start()


@kopf.on.cleanup()
def _stop_resync(**_: Any) -> None:
    if "stop" in _resync:
        _resync["stop"].set()
        _resync["thread"].join(timeout=TIMER_S + 30)
    _known.clear()
