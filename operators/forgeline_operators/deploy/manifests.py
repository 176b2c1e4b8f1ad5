"""Pure builders of a ``ModelEndpoint``'s children: what one *revision* runs, the stable Service and the
weighted ``HTTPRoute``. No client, no decorators: the endpoint controller applies what these return
(server-side apply, field manager ``forgeline-operator``) and ``forgeline render`` prints it.

Per revision ``R`` of endpoint ``N`` (all named ``N-R``, labelled ``forgeline.dev/endpoint: N`` and
``forgeline.dev/revision: R``):

* ``runtime: triton`` -> a ``Deployment`` of Triton (ports 8000 http / 8001 grpc / 8002 metrics, probes on
  ``/v2/health/ready`` and ``/v2/health/live``, ``nvidia.com/gpu`` limits, the model repository from a PVC
  or copied from the object store by an init container), its ``Service``, a ``PodDisruptionBudget``
  (``policy/v1``) and, when ``maxReplicas`` asks for autoscaling, an ``autoscaling/v2`` HPA on Triton's
  queue time (a Pods metric, ``nv_inference_queue_duration_us``, served by the cluster's metrics adapter).
* ``runtime: nim`` -> a ``NIMService`` (``apps.nvidia.com/v1alpha1``, NVIDIA's NIM operator) with
  ``NIM_MODEL_PATH`` (fine-tuned full model, HF layout) and ``NIM_PEFT_SOURCE`` (LoRA adapters) and
  probes on ``/v1/health/*``; the NIM operator makes its Deployment and its Service ``N-R``.

Shared: the stable ``Service`` ``N`` (selects the current revision; clients without a Gateway use it)
and the Gateway API ``HTTPRoute`` ``N`` whose backend weights are the traffic split. None of this has run
against a real GPU node, Triton or NIM image here; it is validated offline against the real schemas.
"""

from __future__ import annotations

import posixpath
from typing import Any

from forgeline_operators.deploy.resources import API_VERSION, KIND, ModelEndpointSpec
from forgeline_operators.deploy.spec import RepositorySourceSpec

__all__ = [
    "ENDPOINT_LABEL",
    "NIM_AUTH_SECRET",
    "QUEUE_METRIC",
    "REVISION_LABEL",
    "TRITON_IMAGE",
    "ManifestError",
    "Owner",
    "autoscales",
    "child_name",
    "endpoint_labels",
    "http_route",
    "model_source",
    "revision_children",
    "revision_labels",
    "stable_service",
]

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"
# Copiers of an object-store model repository into the pod (init container), by URI scheme.
COPIERS = {
    "s3": ("amazon/aws-cli:2.22.35", ["aws", "s3", "sync", "{uri}", "{dest}"]),
    "gs": (
        "gcr.io/google.com/cloudsdktool/google-cloud-cli:stable",
        ["gcloud", "storage", "rsync", "-r", "{uri}", "{dest}"],
    ),
}
# Credentials of the object store, optional: an AWS_* / GOOGLE_* env Secret the cluster admin creates.
OBJECT_STORE_SECRET = "forgeline-object-store"
# The NGC API key Secret the NIM operator expects (its docs name it ``ngc-api-secret``).
NIM_AUTH_SECRET = "ngc-api-secret"
QUEUE_METRIC = "nv_inference_queue_duration_us"
# Per-pod average of the metrics adapter's rate of Triton's queue-time counter (microseconds spent
# queued per second): 200000 = on average 0.2 s of queueing per second, i.e. requests start to wait.
QUEUE_TARGET = "200000"
ENDPOINT_LABEL = "forgeline.dev/endpoint"
REVISION_LABEL = "forgeline.dev/revision"
MODEL_DIR = "/models"
NIM_STORE = "/model-store"  # where the NIM operator mounts ``spec.storage``
_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

Owner = tuple[str, str]  # (ModelEndpoint name, uid)


class ManifestError(ValueError):
    """The endpoint cannot be rendered; the message names the field and the fix."""


def child_name(name: str, revision: str) -> str:
    return f"{name}-{revision}"


def endpoint_labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "forgeline-endpoint",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "forgeline",
        ENDPOINT_LABEL: name,
    }


def revision_labels(name: str, revision: str) -> dict[str, str]:
    return {**endpoint_labels(name), REVISION_LABEL: revision}


def _meta(name: str, namespace: str, labels: dict[str, str], owner: Owner | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": owner[0],
                "uid": owner[1],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def model_source(spec: ModelEndpointSpec) -> RepositorySourceSpec:
    """Where pods read the model: ``kubernetes.repository`` if set, else ``model.uri`` (a
    ``pvc://CLAIM/PATH`` URI is mounted from the claim, anything else is copied by an init container)."""
    if spec.kubernetes.repository is not None:
        return spec.kubernetes.repository
    uri = spec.model.uri
    if uri.startswith("pvc://"):
        claim, _, path = uri[len("pvc://") :].partition("/")
        return RepositorySourceSpec(pvc=claim, path=path)
    return RepositorySourceSpec(uri=uri)


def _tolerations(spec: ModelEndpointSpec) -> list[dict[str, Any]]:
    kube = spec.kubernetes
    if kube.tolerations:
        return [dict(t) for t in kube.tolerations]
    return [dict(_GPU_TOLERATION)] if kube.gpus > 0 else []


def _resources(spec: ModelEndpointSpec) -> dict[str, Any]:
    kube = spec.kubernetes
    out: dict[str, Any] = {
        "requests": {"cpu": kube.cpu, "memory": kube.memory},
        "limits": {"memory": kube.memory},
    }
    if kube.gpus > 0:
        out["limits"]["nvidia.com/gpu"] = str(kube.gpus)
    return out


def _http_probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _copy_init(uri: str, dest: str) -> dict[str, Any]:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in COPIERS:
        raise ManifestError(
            f"model repository {uri!r}: pods can copy from {', '.join(f'{s}://' for s in COPIERS)} only; "
            "put the repository on a PVC and set `kubernetes.repository: {pvc: NAME, path: DIR}`"
        )
    image, argv = COPIERS[scheme]
    return {
        "name": "fetch-model",
        "image": image,
        "command": [a.format(uri=uri.rstrip("/") + "/", dest=dest) for a in argv],
        "envFrom": [{"secretRef": {"name": OBJECT_STORE_SECRET, "optional": True}}],
        "volumeMounts": [{"name": "models", "mountPath": dest}],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
    }


def _triton_pod(spec: ModelEndpointSpec, labels: dict[str, str]) -> dict[str, Any]:
    kube = spec.kubernetes
    repo = model_source(spec)
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    init: list[dict[str, Any]] = []
    if repo.pvc:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": repo.pvc, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": MODEL_DIR, "subPath": repo.path, "readOnly": True})
    else:
        volumes.append({"name": "models", "emptyDir": {}})
        mounts.append({"name": "models", "mountPath": MODEL_DIR})
        init.append(_copy_init(repo.uri or spec.model.uri, MODEL_DIR))
    container = {
        "name": "triton",
        "image": kube.image or TRITON_IMAGE,
        "command": ["tritonserver"],
        "args": [
            f"--model-repository={MODEL_DIR}",
            "--http-port=8000",
            "--grpc-port=8001",
            "--metrics-port=8002",
            # First-response latency histograms: the canary's p95 TTFT gate reads them (gate_metrics).
            "--metrics-config=histogram_latencies=true",
            "--exit-on-error=true",
        ],
        "ports": [
            {"name": "http", "containerPort": 8000, "protocol": "TCP"},
            {"name": "grpc", "containerPort": 8001, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 8002, "protocol": "TCP"},
        ],
        "resources": _resources(spec),
        # Loading a large engine takes minutes: startup allows 30 min before liveness takes over.
        "startupProbe": _http_probe("/v2/health/ready", "http", 10, 180),
        "readinessProbe": _http_probe("/v2/health/ready", "http", 5, 3),
        "livenessProbe": _http_probe("/v2/health/live", "http", 10, 3),
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        "metadata": {
            "labels": labels,
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8002"},
        },
        "spec": {
            "containers": [container],
            "volumes": volumes,
            "nodeSelector": dict(kube.node_selector),
            "tolerations": _tolerations(spec),
            "terminationGracePeriodSeconds": 60,
        },
    }
    if init:
        pod["spec"]["initContainers"] = init
    return pod


def _triton_children(
    name: str, spec: ModelEndpointSpec, revision: str, replicas: int, owner: Owner | None
) -> list[dict[str, Any]]:
    kube = spec.kubernetes
    child = child_name(name, revision)
    labels = revision_labels(name, revision)
    selector = {ENDPOINT_LABEL: name, REVISION_LABEL: revision}
    autoscaled = autoscales(spec, replicas)
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(child, kube.namespace, labels, owner),
            "spec": {
                "selector": {"matchLabels": selector},
                # A revision's pods never change in place (a new spec is a new revision): replace a
                # failed pod without surging past the GPUs the rollout budgeted.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                "template": _triton_pod(spec, labels),
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(child, kube.namespace, labels, owner),
            "spec": {"type": "ClusterIP", "selector": selector, "ports": _triton_ports()},
        },
    ]
    if replicas > 0:
        out.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": _meta(child, kube.namespace, labels, owner),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
            }
        )
    if autoscaled:
        assert kube.max_replicas is not None
        out.append(_hpa(child, kube.namespace, labels, owner, replicas, kube.max_replicas))
    else:
        # With an HPA the replica count is the HPA's: an applied `replicas` would fight it on every
        # reconcile (server-side apply would take the field back), so it is only set without one.
        out[0]["spec"]["replicas"] = replicas
    return out


def autoscales(spec: ModelEndpointSpec, replicas: int) -> bool:
    """Whether a revision at ``replicas`` gets an HPA (``maxReplicas`` above it); then the HPA, not the
    applied manifest, owns the Deployment's replica count (its ``minReplicas`` is ``replicas``)."""
    top = spec.kubernetes.max_replicas
    return replicas > 0 and top is not None and top > replicas


def _triton_ports() -> list[dict[str, Any]]:
    return [
        {"name": n, "port": p, "targetPort": n, "protocol": "TCP"}
        for n, p in (("http", 8000), ("grpc", 8001), ("metrics", 8002))
    ]


def _hpa(
    child: str, namespace: str, labels: dict[str, str], owner: Owner | None, low: int, high: int
) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(child, namespace, labels, owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": child},
            "minReplicas": low,
            "maxReplicas": high,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {"type": "AverageValue", "averageValue": QUEUE_TARGET},
                    },
                }
            ],
            # GPU pods are slow to start: scale down only after 5 quiet minutes.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def _split_image(image: str) -> tuple[str, str]:
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        raise ManifestError(f"kubernetes.image {image!r}: NIM images need an explicit tag (REPOSITORY:TAG)")
    repo, tag = image.rsplit(":", 1)
    return repo, tag


def _pvc_path(uri: str, claim: str) -> str:
    """``pvc://CLAIM/PATH`` -> ``PATH`` (must be on ``claim``)."""
    prefix = f"pvc://{claim}/"
    if not uri.startswith(prefix):
        raise ManifestError(
            f"adapter {uri!r}: with the model on PVC {claim!r}, adapters must be `{prefix}DIR/NAME` on it "
            "(the NIM operator mounts one volume)"
        )
    return uri[len(prefix) :].strip("/")


def _nim_env(spec: ModelEndpointSpec) -> list[dict[str, str]]:
    repo = model_source(spec)
    assert repo.pvc
    env = [{"name": "NIM_MODEL_PATH", "value": posixpath.join(NIM_STORE, repo.path.strip("/")).rstrip("/")}]
    if spec.model.adapters:
        paths = {n: _pvc_path(u, repo.pvc) for n, u in spec.model.adapters.items()}
        parents = {posixpath.dirname(p) for p in paths.values()}
        wrong = [n for n, p in paths.items() if posixpath.basename(p) != n]
        if len(parents) != 1 or wrong:
            raise ManifestError(
                "model.adapters: NIM_PEFT_SOURCE is one directory holding one sub-directory per adapter, "
                f"named as the adapter; got {sorted(paths.values())}"
            )
        env.append({"name": "NIM_PEFT_SOURCE", "value": posixpath.join(NIM_STORE, parents.pop())})
    return env


def _nim_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"enabled": True, "probe": _http_probe(path, "api", period, failures)}


def _nim_children(
    name: str, spec: ModelEndpointSpec, revision: str, replicas: int, owner: Owner | None
) -> list[dict[str, Any]]:
    kube = spec.kubernetes
    if not kube.image:
        raise ManifestError(
            "runtime nim: set `kubernetes.image` to the NIM container of the model family "
            "(NIM for LLMs 2.x: NIM_MODEL_PATH), e.g. nvcr.io/nim/meta/llama-3.1-8b-instruct:2.0.13"
        )
    source = model_source(spec)
    if not source.pvc:
        # k8s-nim-operator v3.1.2 gives NIMService init containers no volume mounts, so nothing can
        # copy a model into the pod: it has to be on a volume already.
        raise ManifestError(
            "runtime nim: the model must be on a PVC: set `kubernetes.repository: {pvc: NAME, path: DIR}` "
            "(NIMService init containers cannot mount volumes to copy from an object store)"
        )
    repository, tag = _split_image(kube.image)
    labels = revision_labels(name, revision)
    nim_spec: dict[str, Any] = {
        "image": {"repository": repository, "tag": tag, "pullSecrets": ["ngc-secret"]},
        "authSecret": NIM_AUTH_SECRET,
        "replicas": replicas,
        "labels": labels,
        "env": _nim_env(spec),
        "storage": {"pvc": {"name": source.pvc, "create": False}, "readOnly": False},
        "resources": _resources(spec),
        "nodeSelector": dict(kube.node_selector),
        "tolerations": _tolerations(spec),
        "expose": {"service": {"type": "ClusterIP", "port": 8000}},
        "startupProbe": _nim_probe("/v1/health/ready", 10, 180),
        "readinessProbe": _nim_probe("/v1/health/ready", 5, 3),
        "livenessProbe": _nim_probe("/v1/health/live", 10, 3),
    }
    if autoscales(spec, replicas):
        nim_spec["scale"] = {
            "enabled": True,
            "hpa": {"minReplicas": replicas, "maxReplicas": kube.max_replicas},
        }
    return [
        {
            "apiVersion": "apps.nvidia.com/v1alpha1",
            "kind": "NIMService",
            "metadata": _meta(child_name(name, revision), kube.namespace, labels, owner),
            "spec": nim_spec,
        }
    ]


def revision_children(
    name: str,
    spec: ModelEndpointSpec,
    revision: str,
    replicas: int,
    *,
    owner: Owner | None = None,
    autoscale: bool = True,
) -> list[dict[str, Any]]:
    """Everything revision ``revision`` of endpoint ``name`` runs, at ``replicas`` replicas.

    ``spec`` is the spec *of that revision* (a stable revision keeps its own spec during a canary);
    ``owner`` = (ModelEndpoint name, uid) adds the controller owner reference. ``autoscale=False``
    pins the count (no HPA even with ``maxReplicas``): a canary must stay within its GPU surge budget.
    """
    if not autoscale:
        kube = spec.kubernetes.model_copy(update={"max_replicas": None})
        spec = spec.model_copy(update={"kubernetes": kube})
    build = _nim_children if spec.runtime == "nim" else _triton_children
    return build(name, spec, revision, replicas, owner)


def stable_service(
    name: str, spec: ModelEndpointSpec, revision: str, *, owner: Owner | None = None
) -> dict[str, Any]:
    """Service ``name``: the endpoint's address for clients without a Gateway; selects ``revision``."""
    kube = spec.kubernetes
    ports = (
        _triton_ports()
        if spec.runtime == "triton"
        else [{"name": "api", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    )
    labels = endpoint_labels(name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, kube.namespace, labels, owner),
        "spec": {
            "type": kube.service_type,
            "selector": {ENDPOINT_LABEL: name, REVISION_LABEL: revision},
            "ports": ports,
        },
    }


def http_route(
    name: str, spec: ModelEndpointSpec, split: dict[str, int], *, owner: Owner | None = None
) -> dict[str, Any]:
    """HTTPRoute ``name``: one rule whose backends are the revisions' Services weighted by ``split``
    (exact percentages, independent of replica counts)."""
    if not split or sum(split.values()) != 100 or any(w < 0 for w in split.values()):
        raise ManifestError(f"traffic split {split}: weights must be >= 0 and sum to 100")
    kube = spec.kubernetes
    labels = endpoint_labels(name)
    route: dict[str, Any] = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _meta(name, kube.namespace, labels, owner),
        "spec": {
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {"kind": "Service", "name": child_name(name, rev), "port": 8000, "weight": weight}
                        for rev, weight in sorted(split.items())
                    ],
                }
            ]
        },
    }
    if kube.gateway:
        namespace, _, gw = kube.gateway.rpartition("/")
        ref: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw}
        if namespace:
            ref["namespace"] = namespace
        route["spec"]["parentRefs"] = [ref]
    return route
