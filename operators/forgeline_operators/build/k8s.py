"""Manifest builders for engine builds on Kubernetes: the ``EngineBuild`` custom resource and the Job
that builds it on a GPU node. Pure functions, no Kubernetes client and no decorators (the controller
that applies them and keeps ``status`` lives with the Kubernetes operators).

An ``EngineBuild`` (``forgeline.dev/v1alpha1``) names a checkpoint on the shared artifact volume (path
and sha256), the TensorRT-LLM build settings (the ``tensorrt_llm`` block of a build stage), the engine
cache key and the output path; its status carries phase, engine path and engine sha256. The Job runs
the build operator's container entrypoint (:mod:`.engine_job`) on a node with ``tp * pp`` GPUs; the
entrypoint reuses a cached engine of the same key instead of building, and reports the result through
the pod's termination message, which the controller copies into the resource's status.

Validated offline against the Kubernetes 1.31 schemas (Job) in tests; never run on a cluster here.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["API_VERSION", "DEFAULT_IMAGE", "KIND", "engine_build", "engine_build_job", "job_name"]

API_VERSION = "forgeline.dev/v1alpha1"
KIND = "EngineBuild"
# TensorRT-LLM's release container of the 1.2 line (the last with trtllm-build); Forgeline is installed
# on top of it by the cluster's image build (the operator's own image), so this is only the default.
DEFAULT_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.0"
_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _dns_label(text: str, limit: int = 63) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:limit].rstrip("-") or "build"


def engine_build(
    name: str,
    *,
    namespace: str,
    checkpoint: str,
    checkpoint_sha256: str,
    settings: dict[str, Any],
    cache_key: str,
    output: str,
    image: str = DEFAULT_IMAGE,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    workflow: str | None = None,
) -> dict[str, Any]:
    """The ``EngineBuild`` resource for one build stage (``settings``: ``TrtllmBuildSpec.model_dump()``)."""
    gpus = int(settings.get("tp", 1)) * int(settings.get("pp", 1))
    labels = {"app.kubernetes.io/managed-by": "forgeline", "forgeline.dev/cache-key": cache_key[:63]}
    if workflow:
        labels["forgeline.dev/workflow"] = _dns_label(workflow)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": _dns_label(name), "namespace": namespace, "labels": labels},
        "spec": {
            "engine": "tensorrt-llm",
            "checkpoint": {"path": checkpoint, "sha256": checkpoint_sha256},
            "tensorrtLLM": settings,
            "cacheKey": cache_key,
            "output": {"path": output},
            "image": image,
            "gpus": gpus,
            "nodeSelector": dict(node_selector or {}),
            "tolerations": list(tolerations if tolerations is not None else [_GPU_TOLERATION]),
        },
    }


def job_name(resource: dict[str, Any]) -> str:
    """One Job per resource and cache key: a changed spec gets a new Job, a retried one the same."""
    key = resource["spec"]["cacheKey"][:10]
    return f"{_dns_label(resource['metadata']['name'], 63 - len(key) - 7)}-build-{key}"


def engine_build_job(
    resource: dict[str, Any],
    *,
    volume_claim: str,
    mount_path: str = "/artifacts",
    owner_uid: str | None = None,
    active_deadline_s: int = 4 * 3600,
    cpu: str = "8",
    memory: str = "64Gi",
) -> dict[str, Any]:
    """The ``batch/v1`` Job that builds ``resource`` on a GPU node, the artifact volume mounted.

    ``owner_uid`` (the resource's uid, known once it exists on the server) makes the Job a garbage-
    collected child of the ``EngineBuild``.
    """
    spec = resource["spec"]
    meta = resource["metadata"]
    args = [
        "--checkpoint",
        spec["checkpoint"]["path"],
        "--settings",
        json.dumps(spec["tensorrtLLM"], sort_keys=True),
        "--out",
        spec["output"]["path"],
        "--cache",
        f"{mount_path.rstrip('/')}/engine-cache",
        "--expect-key",
        spec["cacheKey"],
    ]
    labels = {**meta.get("labels", {}), "forgeline.dev/engine-build": meta["name"]}
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(resource), "namespace": meta["namespace"], "labels": labels},
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": active_deadline_s,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": spec.get("nodeSelector") or {},
                    "tolerations": spec.get("tolerations") or [],
                    "containers": [
                        {
                            "name": "build",
                            "image": spec["image"],
                            "command": ["python", "-m", "forgeline_operators.build.engine_job"],
                            "args": args,
                            "resources": {
                                "limits": {"nvidia.com/gpu": str(spec["gpus"])},
                                "requests": {"cpu": cpu, "memory": memory},
                            },
                            "volumeMounts": [{"name": "artifacts", "mountPath": mount_path}],
                            # The entrypoint writes its JSON result here; the controller reads it back.
                            "terminationMessagePath": "/dev/termination-log",
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "volumes": [{"name": "artifacts", "persistentVolumeClaim": {"claimName": volume_claim}}],
                },
            },
        },
    }
    if owner_uid:
        job["metadata"]["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "uid": owner_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return job
