"""The nemo backend on ``target: kubernetes``: apply the rendered KubeRay ``RayJob`` (or the headless
``Service`` + indexed ``Job``) and wait for it to finish.

A finished object of the same name (a previous run) is deleted first: KubeRay and the Job controller
never rerun a completed one. Progress is read from the objects' status (RayJob ``jobDeploymentStatus`` /
``jobStatus``, Job ``succeeded`` / ``Failed`` condition) with a deadline; the trainer's checkpoints land on
the shared directory (the PVC), where the stage reads them back. Tested against the real API server
of the k8s tier with KubeRay's RayJob CRD, the status written by the test in KubeRay's place; the
KubeRay operator and the NeMo containers are not run here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from forgeline_operators.kube.client import Kube, wait_for

__all__ = ["LaunchFailed", "run_on_cluster"]

_RAYJOB_DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


class LaunchFailed(RuntimeError):
    """The job ran on the cluster and failed, or did not finish in time (message from its status)."""


def _delete_previous(kube: Kube, obj: dict[str, Any], timeout_s: float) -> None:
    meta = obj["metadata"]
    if kube.get(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace")) is None:
        return
    kube.delete(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"), propagation="Foreground")
    wait_for(
        lambda: kube.get(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace")) is None,
        timeout_s,
        f"the previous {obj['kind']} {meta['name']} to be deleted",
    )


def _rayjob_state(obj: dict[str, Any]) -> tuple[bool, str | None]:
    """(finished, failure message or None)."""
    st = obj.get("status") or {}
    job, deployment = st.get("jobStatus"), st.get("jobDeploymentStatus")
    if job in _RAYJOB_DONE or deployment in ("Complete", "Failed"):
        if job == "SUCCEEDED":
            return True, None
        return (
            True,
            f"RayJob ended {job or deployment}: {st.get('message') or st.get('reason') or 'no message'}",
        )
    return False, None


def _job_state(obj: dict[str, Any]) -> tuple[bool, str | None]:
    spec, st = obj.get("spec") or {}, obj.get("status") or {}
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return True, f"Job failed: {cond.get('reason')}: {cond.get('message')}"
    return int(st.get("succeeded") or 0) >= int(spec.get("completions") or 1), None


def run_on_cluster(
    kube: Kube,
    objects: list[dict[str, Any]],
    *,
    timeout_s: float,
    poll_s: float = 10.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Apply ``objects`` (the last one is the RayJob or Job to wait for); returns its final status."""
    main = objects[-1]
    if main["kind"] == "RayJob" and not kube.has_api("ray.io/v1", "RayJob"):
        raise LaunchFailed(
            "this cluster has no KubeRay (ray.io/v1 RayJob is not served): install the operator"
        )
    _delete_previous(kube, main, timeout_s=120)
    for obj in objects:
        kube.apply(obj)
    meta = main["metadata"]
    log(f"applied {main['kind']} {meta.get('namespace')}/{meta['name']}; waiting for it to finish")
    state = _rayjob_state if main["kind"] == "RayJob" else _job_state
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        current = kube.get(main["apiVersion"], main["kind"], meta["name"], meta.get("namespace")) or {}
        done, failure = state(current)
        status = current.get("status") or {}
        summary = status.get("jobDeploymentStatus") or status.get("active")
        if summary != last:
            log(f"{main['kind']} {meta['name']}: {summary}")
            last = summary
        if done:
            if failure:
                raise LaunchFailed(failure)
            return dict(status)
        if time.monotonic() > deadline:
            raise LaunchFailed(f"{main['kind']} {meta['name']} did not finish within {timeout_s:g} s")
        time.sleep(poll_s)  # a remote job's state: nothing to wait on but the API
