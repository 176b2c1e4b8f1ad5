"""Launch objects for a rendered NeMo job, as pure functions: a Ray job in the trainer image, a KubeRay
``RayJob`` (``ray.io/v1``), and an indexed Kubernetes ``Job`` (torchrun across pods) with its headless
``Service``.

* Ray (workflow ``target: local`` / ``--ray-address``): the job script as the entrypoint of a Ray job
  whose ``runtime_env`` is ``{"image_uri": IMAGE, "env_vars": ...}`` (Ray's image_uri plugin runs the
  entrypoint in that image with podman) and ``entrypoint_num_gpus`` = GPUs of one node. Single-node for
  Megatron-Bridge (one torchrun); NeMo-RL DPO places its own Ray workers on every node.
* ``RayJob``: a Ray cluster of the trainer image (a CPU head, ``nodes`` GPU workers) that runs the same
  entrypoint; ``entrypointNumGpus`` pins a Megatron-Bridge driver onto a GPU worker.
* ``Job``: ``completionMode: Indexed``, one pod per node, ``JOB_COMPLETION_INDEX`` as torchrun's node rank,
  pod 0 reached through the headless Service as the rendezvous (Megatron-Bridge only: NeMo-RL needs Ray).

Every pod mounts the shared directory (``nemo.pvc``, else a hostPath of the same path) and a memory
``/dev/shm`` for NCCL and the data loaders.
"""

from __future__ import annotations

import copy
import shlex
from typing import Any

import yaml

from forgeline_operators.finetune.nemo.render import MASTER_PORT, JobInputs, Rendered, RenderError

__all__ = ["job_manifests", "k8s_name", "ray_job", "rayjob_manifest"]

GPU = "nvidia.com/gpu"
SHM_GIB = 64


def k8s_name(*parts: str) -> str:
    """A DNS-1123 label from workflow/stage names (lowercase, ``-``, at most 52 chars for pod suffixes)."""
    text = "-".join(parts).lower().replace("_", "-")
    text = "".join(c if c.isalnum() or c == "-" else "-" for c in text).strip("-")
    return text[:52].rstrip("-") or "forgeline-nemo"


def _env(job: JobInputs, r: Rendered) -> dict[str, str]:
    env = {"FORGELINE_JOB": job.name, "NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    if r.trainer == "megatron-bridge":
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # Megatron's TP comm/compute overlap expects it
    return env


def ray_job(r: Rendered, job: JobInputs) -> dict[str, Any]:
    """Keyword arguments of ``ray.job_submission.JobSubmissionClient.submit_job``."""
    if r.trainer == "megatron-bridge" and r.nodes > 1:
        raise RenderError(
            f"{r.world_size} GPUs span {r.nodes} nodes: a Ray job runs one torchrun on one node; use the "
            "kubernetes target with nemo.launcher: job (one pod per node)"
        )
    return {
        "submission_id": job.name,
        "entrypoint": shlex.join(r.entrypoint),
        "runtime_env": {"image_uri": r.image, "env_vars": _env(job, r)},
        "entrypoint_num_cpus": 1,
        "entrypoint_num_gpus": r.gpus_per_node if r.trainer == "megatron-bridge" else 0,
        "metadata": {"forgeline.trainer": r.trainer, "forgeline.release": r.release},
    }


def _volumes(stage: Any, job: JobInputs) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pvc = stage.nemo.pvc if stage.nemo else None
    shared: dict[str, Any] = {"name": "shared"}
    if pvc:
        shared["persistentVolumeClaim"] = {"claimName": pvc}
    else:
        shared["hostPath"] = {"path": job.shared_dir, "type": "DirectoryOrCreate"}
    dshm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GIB}Gi"}}
    mounts = [{"name": "shared", "mountPath": job.shared_dir}, {"name": "dshm", "mountPath": "/dev/shm"}]
    return [shared, dshm], mounts


def _labels(job: JobInputs) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "forgeline", "forgeline.io/job": job.name}


def _metadata(stage: Any, job: JobInputs) -> dict[str, Any]:
    return {
        "name": job.name,
        "namespace": stage.nemo.namespace if stage.nemo else "default",
        "labels": _labels(job),
    }


def _container(
    name: str, r: Rendered, job: JobInputs, mounts: list[dict[str, Any]], gpus: int
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "image": r.image,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": k, "value": v} for k, v in _env(job, r).items()],
        "volumeMounts": mounts,
    }
    if gpus:
        c["resources"] = {"limits": {GPU: gpus}, "requests": {GPU: gpus}}
    return c


def rayjob_manifest(stage: Any, r: Rendered, job: JobInputs) -> dict[str, Any]:
    """A KubeRay ``RayJob`` running the job script on a Ray cluster of the trainer image."""
    volumes, mounts = _volumes(stage, job)
    if r.trainer == "megatron-bridge" and r.nodes > 1:
        raise RenderError(
            f"{r.world_size} GPUs span {r.nodes} nodes: Megatron-Bridge runs one torchrun per node; "
            "set nemo.launcher: job for multi-node sft/lora on Kubernetes"
        )
    # Separate copies: shared lists would come out of the YAML dump as anchors and aliases.
    head = {
        "metadata": {"labels": _labels(job)},
        "spec": {
            "containers": [_container("ray-head", r, job, copy.deepcopy(mounts), 0)],
            "volumes": volumes,
        },
    }
    worker = {
        "metadata": {"labels": _labels(job)},
        "spec": {
            "containers": [_container("ray-worker", r, job, copy.deepcopy(mounts), r.gpus_per_node)],
            "volumes": copy.deepcopy(volumes),
        },
    }
    spec: dict[str, Any] = {
        "entrypoint": shlex.join(r.entrypoint),
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": _env(job, r)}, sort_keys=False),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        "submissionMode": "K8sJobMode",
        "entrypointNumGpus": r.gpus_per_node if r.trainer == "megatron-bridge" else 0,
        "rayClusterSpec": {
            "headGroupSpec": {"rayStartParams": {"num-gpus": "0"}, "template": head},
            "workerGroupSpecs": [
                {
                    "groupName": "gpu",
                    "replicas": r.nodes,
                    "minReplicas": r.nodes,
                    "maxReplicas": r.nodes,
                    "rayStartParams": {},
                    "template": worker,
                }
            ],
        },
    }
    if stage.timeout_minutes:
        spec["activeDeadlineSeconds"] = int(stage.timeout_minutes * 60)
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(stage, job), "spec": spec}


def job_manifests(stage: Any, r: Rendered, job: JobInputs) -> list[dict[str, Any]]:
    """Headless ``Service`` + indexed ``Job``: one pod per node, torchrun rendezvous on pod 0."""
    if r.trainer != "megatron-bridge":
        raise RenderError("NeMo-RL DPO drives its workers through Ray: use nemo.launcher: rayjob")
    volumes, mounts = _volumes(stage, job)
    meta = _metadata(stage, job)
    container = _container("trainer", r, job, mounts, r.gpus_per_node)
    container["command"] = list(r.entrypoint)
    container["env"].append({"name": "MASTER_ADDR", "value": f"{job.name}-0.{job.name}"})
    container["ports"] = [{"name": "rdzv", "containerPort": MASTER_PORT, "protocol": "TCP"}]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": {"batch.kubernetes.io/job-name": job.name},
            "ports": [{"name": "rdzv", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
            "publishNotReadyAddresses": True,  # rendezvous before any pod is Ready
        },
    }
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": r.nodes,
        "parallelism": r.nodes,
        "backoffLimit": 0,  # a failed rank fails the job; resume comes from checkpoint.load
        "template": {
            "metadata": {"labels": _labels(job)},
            "spec": {
                "subdomain": job.name,
                "restartPolicy": "Never",
                "containers": [container],
                "volumes": volumes,
            },
        },
    }
    if stage.timeout_minutes:
        job_spec["activeDeadlineSeconds"] = int(stage.timeout_minutes * 60)
    return [service, {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}]
