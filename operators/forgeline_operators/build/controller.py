"""The ``EngineBuild`` controller (kopf), thin: every handler reads the resource, its build Job and the
Job's pods, asks the pure :func:`.reconcile.reconcile` what to do, then creates the Job (server-side
apply, field manager ``forgeline-operator``, owned by the resource so deleting it garbage-collects the
Job) and writes ``status``. Triggers: create / update of the spec / resume (an operator restart resumes
from ``status``), and every event of a build Job (``forgeline.dev/engine-build`` label; kopf re-lists
on every watch restart, so no periodic timer: kopf's timers add a finalizer, and nothing outside the
cluster needs cleaning up).

Configuration (environment of the operator Deployment): ``FORGELINE_ARTIFACTS_PVC`` (the artifact
volume claim the build Job mounts, default ``forgeline-artifacts``) and ``FORGELINE_ENGINE_CACHE`` (the
engine cache directory as mounted in the operator pod; when set, an engine of the same key there is a
cache hit and no Job is created).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf

from forgeline.artifacts import dir_digest
from forgeline_operators.build.k8s import API_VERSION, KIND, job_name
from forgeline_operators.build.operator import ENGINE_CACHE_ENV, cached_engine
from forgeline_operators.build.reconcile import EngineRecord, reconcile
from forgeline_operators.lib.kube_client import Kube, connect

__all__ = ["lookup_engine", "step"]

GROUP, VERSION, PLURAL = "forgeline.dev", "v1alpha1", "enginebuilds"
BUILD_LABEL = "forgeline.dev/engine-build"
PVC_ENV = "FORGELINE_ARTIFACTS_PVC"
_log = logging.getLogger("forgeline.operator.build")
_state: dict[str, Kube] = {}
# Job events and the timer can fire for the same resource at once (kopf serializes per object, not
# across kinds): one reconcile at a time keeps the status writes ordered.
_lock = threading.Lock()


def _kube() -> Kube:
    if "kube" not in _state:
        _state["kube"] = connect()
    return _state["kube"]


def lookup_engine(key: str) -> EngineRecord | None:
    """An engine of ``key`` in the engine cache the operator pod mounts (``$FORGELINE_ENGINE_CACHE``)."""
    root = os.environ.get(ENGINE_CACHE_ENV)
    hit = cached_engine(Path(root), key) if root else None
    if hit is None:
        return None
    engines = tuple(sorted(p.name for p in hit.glob("rank*.engine")))
    return EngineRecord(path=str(hit), sha256=dir_digest(hit), form="engine", engines=engines)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def step(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    """Reconcile one ``EngineBuild`` once; returns the status written (None: nothing to do)."""
    with _lock:
        body = kube.get(API_VERSION, KIND, name, namespace)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        jname = job_name(body)
        job = kube.get("batch/v1", "Job", jname, namespace)
        pods = kube.list("v1", "Pod", namespace, label_selector=f"job-name={jname}") if job else []
        out = reconcile(
            body,
            job,
            pods,
            lookup=lookup_engine,
            volume_claim=os.environ.get(PVC_ENV, "forgeline-artifacts"),
            now=_now(),
        )
        if out.job is not None:
            kube.apply(out.job)
        if not out.changed:
            return None
        old = body.get("status") or {}
        # A merge patch keeps keys it does not name: clear what the new status no longer has.
        kube.patch_status(body, {**{k: None for k in old if k not in out.status}, **out.status})
        _log.info("EngineBuild %s/%s: %s", namespace, name, out.status.get("phase"))
        return out.status


@kopf.on.startup()
def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler progress in annotations: the CRD's structural status schema has no `kopf` field.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="forgeline.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="forgeline.dev")
    settings.posting.level = logging.WARNING
    _state.pop("kube", None)  # a (re)started operator reconnects with the current configuration


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def _on_change(namespace: str | None, name: str, **_: Any) -> None:
    step(_kube(), namespace or "default", name)


@kopf.on.event("batch", "v1", "jobs", labels={BUILD_LABEL: kopf.PRESENT})
def _on_job(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    step(_kube(), namespace or "default", labels[BUILD_LABEL])
