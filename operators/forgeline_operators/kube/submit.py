"""``forgeline run FILE --on kubernetes``: submit a whole workflow as a KubeRay ``RayJob``.

The workflow file and its datasets travel in a ``ConfigMap`` mounted at ``/workflows`` on the Ray head
(from the folder holding the file and every dataset, so every relative path in the YAML still holds).
The ``RayJob`` (:func:`.kuberay.workflow_rayjob`) starts a Ray cluster of the Forgeline image, runs
``forgeline run`` there against the artifact PVC (the Forgeline home: stage store, MLflow store,
endpoints) and tears the cluster down afterwards. Datasets that do not fit a ConfigMap (1 MiB in all)
must live on the artifact PVC or object storage and be referenced by those paths; submission says so
instead of failing later.

Both objects are server-side applied with the operator's field manager, so submitting the same
workflow again updates them in place. Tested against the real API server of the k8s tier with KubeRay's
RayJob CRD installed; the KubeRay operator (which turns the RayJob into pods) is not run here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from forgeline.spec import LoadedWorkflow
from forgeline_operators.kube import kuberay
from forgeline_operators.lib.kube_client import Kube

__all__ = ["CONFIGMAP_LIMIT", "SubmitError", "submission", "submit"]

CONFIGMAP_LIMIT = 900 * 1024  # a ConfigMap holds 1 MiB in all; leave room for keys and metadata


class SubmitError(ValueError):
    """The workflow cannot be submitted as it is (the message says what to change)."""


def _key(rel: str) -> str:
    return re.sub(r"[^-._a-zA-Z0-9]", "_", rel.replace("/", "__"))


def job_name(workflow: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"forgeline-{workflow}".lower())[:52].rstrip("-")


def submission(
    loaded: LoadedWorkflow,
    *,
    namespace: str = "default",
    artifacts_pvc: str = "forgeline-artifacts",
    image: str = kuberay.FORGELINE_IMAGE,
    gpu_workers: int = 1,
    gpus_per_worker: int = 1,
) -> list[dict[str, Any]]:
    """The ConfigMap (workflow + datasets) and the RayJob that runs the workflow on a cluster."""
    name = job_name(loaded.workflow.name)
    wf_path = loaded.path.resolve()
    local: dict[str, Path] = {}
    for ds_name, spec in sorted(loaded.workflow.data.items()):
        if str(spec.path).startswith("/artifacts/"):
            continue  # already on the artifact PVC, at the same path on every pod
        local[ds_name] = loaded.dataset_path(ds_name).resolve()
    # Mounted at /workflows from the folder that holds the file and every dataset (e.g. `workflows/`
    # for `examples/x.yaml` reading `../data/y.jsonl`), so every relative path in the YAML still holds.
    root = Path(os.path.commonpath([wf_path.parent, *(p.parent for p in local.values())]))
    file_rel = wf_path.relative_to(root).as_posix()
    files: dict[str, str] = {file_rel: loaded.text}
    total = len(loaded.text.encode())
    for path in local.values():
        text = path.read_text()
        total += len(text.encode())
        files[path.relative_to(root).as_posix()] = text
    if total > CONFIGMAP_LIMIT:
        raise SubmitError(
            f"the workflow and its datasets are {total / 2**20:.1f} MiB; a ConfigMap holds 1 MiB: put the "
            "datasets on the artifact PVC (paths /artifacts/...) or object storage"
        )
    configmap = kuberay.workflow_configmap(name, namespace, file_rel, loaded.text)
    configmap["data"] = {_key(rel): text for rel, text in files.items()}
    rayjob = kuberay.workflow_rayjob(
        name,
        namespace,
        file_rel,
        configmap=name,
        image=image,
        artifacts_pvc=artifacts_pvc,
        gpu_workers=gpu_workers,
        gpus_per_worker=gpus_per_worker,
    )
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    for volume in head["volumes"]:
        if volume["name"] == "workflow":  # every file at its relative path under /workflows
            volume["configMap"]["items"] = [{"key": _key(rel), "path": rel} for rel in sorted(files)]
    return [configmap, rayjob]


def submit(kube: Kube, objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply the submission; returns the RayJob as stored. KubeRay must be installed."""
    from kubernetes.dynamic.exceptions import NotFoundError

    no_kuberay = SubmitError(
        "this cluster has no KubeRay (ray.io/v1 RayJob is not served): install the KubeRay operator "
        "(helm install kuberay-operator kuberay/kuberay-operator), or render the objects with "
        "`forgeline render FILE --on kubernetes` for later"
    )
    if not kube.has_api("ray.io/v1", "RayJob"):
        raise no_kuberay
    out: dict[str, Any] = {}
    for obj in objects:
        try:
            out = kube.apply(obj)
        except NotFoundError:
            # Discovery can still list a CRD that was just deleted (seen in CI): the apply then 404s.
            if obj.get("apiVersion", "").startswith("ray.io/"):
                raise no_kuberay from None
            raise
    return out
