"""The ``EngineBuild`` reconciler, pure: (resource as read, its build Job and that Job's pods as observed,
an engine-cache lookup, now) -> (the Job to create or None, the new status). No client, no kopf; the
controller (:mod:`.controller`) reads and writes the cluster around it.

Rules: a resource whose status already records a finished build of this generation and cache key is
left alone (an operator restart resumes from ``status``, it never rebuilds). Otherwise an engine of the
same key already on the artifact store (``lookup``: the shared engine cache :func:`.operator.cached_engine`
reads) is a cache hit -> Succeeded with no Job. Else the build Job (:func:`.k8s.engine_build_job`, owned
by the resource) is created and followed: active -> Running, complete -> Succeeded with the engine path
and sha256 the entrypoint (:mod:`.engine_job`) wrote to its pod's termination message, failed ->
Failed with that message. Conditions Ready / Progressing / Degraded and ``observedGeneration`` follow the
Kubernetes API conventions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from forgeline_operators.build.k8s import engine_build_job, job_name
from forgeline_operators.build.resources import EngineBuildStatus, from_cr
from forgeline_operators.lib.kube_conditions import Condition, set_condition
from forgeline_operators.lib.kube_crd import to_wire

__all__ = ["EngineRecord", "Outcome", "reconcile", "termination_result"]


@dataclass(frozen=True)
class EngineRecord:
    """An engine already on the artifact store for a cache key."""

    path: str
    sha256: str
    form: str = "engine"
    engines: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What the controller does: create ``job`` (when not None) and write ``status`` (wire form)."""

    job: dict[str, Any] | None
    status: dict[str, Any]
    changed: bool


def termination_result(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entrypoint's JSON result from the newest terminated build container's termination message;
    a message that is not JSON (``FallbackToLogsOnError`` gives the log tail) becomes a failure text."""
    found: list[tuple[str, dict[str, Any]]] = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                found.append((str(term.get("finishedAt") or ""), term))
    if not found:
        return None
    term = max(found, key=lambda t: t[0])[1]
    text = (term.get("message") or "").strip()
    try:
        result = json.loads(text)
    except ValueError:
        result = None
    if isinstance(result, dict):
        return result
    code = term.get("exitCode")
    return {
        "phase": "Succeeded" if code == 0 else "Failed",
        "reason": term.get("reason") or "NoResult",
        "message": text[-2000:] or f"the build container exited {code} without a termination message",
    }


def _job_state(job: dict[str, Any]) -> str:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            return str(c["type"])
    return "Active"


def _job_failure_text(job: dict[str, Any]) -> str:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return f"{c.get('reason', 'Failed')}: {c.get('message', '')}".strip()
    return "the build Job failed"


Flag = Literal["True", "False", "Unknown"]


def _conditions(
    old: list[Condition],
    gen: int,
    now: str,
    ready: Flag,
    progressing: Flag,
    degraded: Flag,
    reason: str,
    message: str,
) -> list[Condition]:
    out = old
    flags: tuple[tuple[str, Flag], ...] = (
        ("Ready", ready),
        ("Progressing", progressing),
        ("Degraded", degraded),
    )
    for kind, flag in flags:
        cond = Condition(
            type=kind,
            status=flag,
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=gen,
        )
        out = set_condition(out, cond)
    return out


def reconcile(
    resource: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    *,
    lookup: Callable[[str], EngineRecord | None],
    volume_claim: str,
    now: str,
) -> Outcome:
    """One reconcile step for ``resource`` (see the module docstring)."""
    spec, status = from_cr(resource)
    meta = resource["metadata"]
    gen = int(meta.get("generation") or 1)
    key = spec.cache_key
    done = status.phase in ("Succeeded", "Failed") and status.cache_key == key
    if done and status.observed_generation == gen:
        return Outcome(None, to_wire(status), changed=False)

    def finish(new: EngineBuildStatus, job_out: dict[str, Any] | None = None) -> Outcome:
        wire = to_wire(new)
        return Outcome(job_out, wire, changed=wire != to_wire(status))

    base = {"observed_generation": gen, "cache_key": key}
    if done:
        # A spec change that keeps the key (image, placement): the result stands. A failed build is
        # retried by deleting the resource (its Job goes with it) or changing what the key covers.
        return finish(status.model_copy(update=base))

    name = job_name(resource)
    if job is None:
        hit = lookup(key)
        if hit is not None:
            message = f"engine {key[:12]} already on the artifact store: reused, no build Job"
            return finish(
                EngineBuildStatus(
                    phase="Succeeded",
                    path=hit.path,
                    sha256=hit.sha256,
                    cache="hit",
                    form=hit.form,
                    engines=list(hit.engines),
                    job_name=None,
                    conditions=_conditions(
                        status.conditions, gen, now, "True", "False", "False", "CacheHit", message
                    ),
                    **base,
                )
            )
        desired = engine_build_job(resource, volume_claim=volume_claim, owner_uid=meta["uid"])
        message = f"build Job {name} created"
        return finish(
            EngineBuildStatus(
                phase="Pending",
                job_name=name,
                conditions=_conditions(
                    status.conditions, gen, now, "False", "True", "False", "JobCreated", message
                ),
                **base,
            ),
            desired,
        )

    state = _job_state(job)
    if state == "Active":
        running = any((p.get("status") or {}).get("phase") == "Running" for p in pods)
        message = f"build Job {name} {'running' if running else 'waiting for a GPU node'}"
        return finish(
            status.model_copy(
                update={
                    **base,
                    "phase": "Running" if running else "Pending",
                    "job_name": name,
                    "conditions": _conditions(
                        status.conditions, gen, now, "False", "True", "False", "Building", message
                    ),
                }
            )
        )
    result = termination_result(pods) or {}
    if state == "Complete" and result.get("phase") == "Succeeded":
        message = f"engine published at {result.get('path')}"
        return finish(
            EngineBuildStatus(
                phase="Succeeded",
                job_name=name,
                path=result.get("path"),
                sha256=result.get("sha256"),
                cache=result.get("cache"),
                form=result.get("form"),
                engines=list(result.get("engines") or []),
                conditions=_conditions(
                    status.conditions, gen, now, "True", "False", "False", "Built", message
                ),
                **base,
            )
        )
    reason = str(result.get("reason") or ("NoResult" if state == "Complete" else "JobFailed"))
    if state == "Complete":
        message = f"the build Job completed without a result in its termination message: {result or 'none'}"
    else:
        message = str(result.get("message") or _job_failure_text(job))
    return finish(
        EngineBuildStatus(
            phase="Failed",
            job_name=name,
            reason=reason,
            message=message,
            conditions=_conditions(status.conditions, gen, now, "False", "False", "True", reason, message),
            **base,
        )
    )
