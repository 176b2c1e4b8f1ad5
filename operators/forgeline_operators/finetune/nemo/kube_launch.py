"""The nemo backend on ``target: kubernetes``: apply the rendered KubeRay ``RayJob`` (or the headless
``Service`` + indexed ``Job``) and wait for it to finish.

A finished object of the same name (a previous run) is deleted first: KubeRay and the Job controller
never rerun a completed one. Progress is read from the objects' status (RayJob ``jobDeploymentStatus`` /
``jobStatus``, Job ``succeeded`` / ``Failed`` condition) with a deadline; the trainer's checkpoints land on
the shared directory (the PVC), where the stage reads them back. Tested against the real API server
of the k8s tier with KubeRay's RayJob CRD, the status written by the test in KubeRay's place; the
KubeRay operator and the NeMo containers are not run here.

While it waits, :class:`PodLogs` reads the log of the pod that prints the trainer's metrics through the
API server (``pods/log``, with timestamps; each read asks for the last poll's worth plus a margin and
drops what it returned before: lines older than the last timestamp seen, and as many lines of that
timestamp as were returned -- the lines of one chunk share a timestamp): KubeRay's submitter pod of a
RayJob (it follows the Ray job's output), or the last pod of an indexed Job (Megatron prints on the last
rank). The lines go to the caller (:class:`..metrics.MetricTail` in the operator). Tested through the
real API server against a kubelet log endpoint the test serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from forgeline_operators.lib.kube_client import Kube, wait_for

__all__ = ["LaunchFailed", "PodLogs", "run_on_cluster"]

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


class PodLogs:
    """New log lines of the pod that carries a RayJob's / an indexed Job's trainer output."""

    def __init__(self, kube: Kube, main: dict[str, Any], margin_s: float = 60.0) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(kube.api)
        self.namespace = main["metadata"].get("namespace") or "default"
        # KubeRay's submitter is a Job named after the RayJob; the Job controller labels its pods job-name.
        self.selector = f"job-name={main['metadata']['name']}"
        self.last_index = (
            int((main.get("spec") or {}).get("completions") or 1) - 1 if main["kind"] == "Job" else None
        )
        self.margin_s = margin_s
        self.pod: str | None = None
        self.last_stamp = ""  # RFC 3339 timestamp of the last line returned
        self.seen_at_last = 0  # how many lines stamped last_stamp were returned
        self.last_read: float | None = None

    def _find_pod(self) -> str | None:
        found = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector)
        pods: list[Any] = list(found.items)
        if self.last_index is not None:
            key = "batch.kubernetes.io/job-completion-index"
            pods = [p for p in pods if (p.metadata.annotations or {}).get(key) == str(self.last_index)]
        started = [p for p in pods if p.status and p.status.phase in ("Running", "Succeeded", "Failed")]
        if not started:
            return None
        newest = max(started, key=lambda p: str(p.metadata.creation_timestamp))
        return str(newest.metadata.name)

    def read(self) -> list[str]:
        """Lines logged since the last call (none while the pod has not started; never raises)."""
        from kubernetes.client import ApiException

        try:
            pod = self._find_pod()
            if pod is None:
                return []
            if pod != self.pod:  # a new pod (a retry): its log starts over
                self.pod, self.last_stamp, self.seen_at_last, self.last_read = pod, "", 0, None
            since = None
            if self.last_read is not None:
                since = max(1, int(time.monotonic() - self.last_read + self.margin_s))
            now = time.monotonic()
            text = self.core.read_namespaced_pod_log(
                pod, self.namespace, timestamps=True, since_seconds=since, _request_timeout=30
            )
        except (ApiException, OSError, ValueError):  # the pod went, or the kubelet is not answering
            return []
        self.last_read = now
        out = []
        at_last = 0  # lines of this read stamped last_stamp (a chunk's lines share one timestamp)
        for raw in str(text or "").splitlines():
            stamp, _, line = raw.partition(" ")
            stamp = _fixed_width(stamp)
            if stamp < self.last_stamp:
                continue  # read before: the margin overlaps the previous read
            if stamp == self.last_stamp:
                at_last += 1
                if at_last <= self.seen_at_last:
                    continue
                self.seen_at_last = at_last
            else:
                self.last_stamp, self.seen_at_last, at_last = stamp, 1, 1
            out.append(line)
        return out


def _fixed_width(stamp: str) -> str:
    """RFC 3339 with 9 fractional digits (the kubelet's format; a trimmed one would not sort as text)."""
    if not stamp.endswith("Z"):
        return stamp
    whole, _, frac = stamp[:-1].partition(".")
    return f"{whole}.{frac.ljust(9, '0')}Z"


def run_on_cluster(
    kube: Kube,
    objects: list[dict[str, Any]],
    *,
    timeout_s: float,
    poll_s: float = 10.0,
    log: Callable[[str], None] = print,
    on_lines: Callable[[list[str]], None] | None = None,
) -> dict[str, Any]:
    """Apply ``objects`` (the last one is the RayJob or Job to wait for); returns its final status.
    ``on_lines`` receives the trainer pod's new log lines on every poll, and once more at the end."""
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
    logs = PodLogs(kube, main) if on_lines is not None else None
    while True:
        current = kube.get(main["apiVersion"], main["kind"], meta["name"], meta.get("namespace")) or {}
        done, failure = state(current)
        if logs is not None and on_lines is not None:
            on_lines(logs.read())
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
