"""KubeRay (``ray.io/v1``) objects that run a whole Forgeline workflow on a cluster: a ``RayCluster`` of the
Forgeline image (CPU head, GPU workers) and a ``RayJob`` whose entrypoint is ``forgeline run`` on a
workflow file mounted from a ``ConfigMap``. The artifact PVC is mounted at ``/artifacts`` on every pod
(the Forgeline home lives there, so stages on different nodes share outputs). Pure builders: the
templates under ``k8s/kuberay/`` and ``forgeline render --on kubernetes`` both come from here.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FORGELINE_IMAGE",
    "RAY_VERSION",
    "ray_cluster",
    "ray_cluster_spec",
    "workflow_configmap",
    "workflow_rayjob",
]

# Placeholder: the image the cluster builds from this repository (see k8s/operator/deployment.yaml).
FORGELINE_IMAGE = "ghcr.io/forgeline/forgeline:0.1.0"
RAY_VERSION = "2.60.0"  # must match the ray in the image (requirements/cpu.lock)
HOME = "/artifacts/home"
_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _pod(
    image: str, pvc: str, cpu: str, memory: str, gpus: int, extra_mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    limits: dict[str, str] = {"memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "ray",
                "image": image,
                "env": [{"name": "FORGELINE_HOME", "value": HOME}],
                "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
                "volumeMounts": [
                    {"name": "artifacts", "mountPath": "/artifacts"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    *extra_mounts,
                ],
            }
        ],
        "volumes": [
            {"name": "artifacts", "persistentVolumeClaim": {"claimName": pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if gpus:
        spec["tolerations"] = [dict(_GPU_TOLERATION)]
    return {"spec": spec}


def ray_cluster_spec(
    *,
    image: str = FORGELINE_IMAGE,
    artifacts_pvc: str = "forgeline-artifacts",
    gpu_workers: int = 1,
    gpus_per_worker: int = 1,
    workflow_configmap: str | None = None,
) -> dict[str, Any]:
    """``RayClusterSpec``: a CPU head (runs the driver: planning, tracking) and a GPU worker group."""
    mounts: list[dict[str, Any]] = []
    head = _pod(image, artifacts_pvc, "2", "8Gi", 0, mounts)
    if workflow_configmap:
        head["spec"]["containers"][0]["volumeMounts"].append({"name": "workflow", "mountPath": "/workflows"})
        head["spec"]["volumes"].append({"name": "workflow", "configMap": {"name": workflow_configmap}})
    worker = _pod(image, artifacts_pvc, "8", "64Gi", gpus_per_worker, mounts)
    return {
        "rayVersion": RAY_VERSION,
        # The driver's stages must not land on the head: it advertises no CPUs to Ray.
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": head},
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": gpu_workers,
                "minReplicas": gpu_workers,
                "maxReplicas": gpu_workers,
                "rayStartParams": {},
                "template": worker,
            }
        ],
    }


def ray_cluster(name: str, namespace: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "forgeline"},
        },
        "spec": ray_cluster_spec(**kwargs),
    }


def workflow_configmap(name: str, namespace: str, file_name: str, text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "forgeline"},
        },
        "data": {file_name: text},
    }


def workflow_rayjob(
    name: str, namespace: str, file_name: str, *, configmap: str, **cluster: Any
) -> dict[str, Any]:
    """A ``RayJob`` that runs ``forgeline run /workflows/FILE`` on its own Ray cluster, then tears it down."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "forgeline"},
        },
        "spec": {
            "entrypoint": f"forgeline run /workflows/{file_name} --ray-address auto --home {HOME}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": ray_cluster_spec(workflow_configmap=configmap, **cluster),
        },
    }
