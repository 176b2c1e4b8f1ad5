"""The ``ModelEndpoint`` custom resource (``forgeline.dev/v1alpha1``): its spec and status models, its
CRD, the revision hash, and the conversion between the models and the CR's camelCase wire form.

The spec reuses the workflow's own models (``RolloutSpec``, ``KubernetesDeploySpec``), so a deploy
stage's YAML and the CR are the same fields; :func:`forgeline_operators.lib.kube_crd.crd` turns them into
the CRD's structural schema. A *revision* is the hash of what a pod runs (runtime, model, the pod-
relevant ``kubernetes`` settings); replica counts are not part of it, so scaling never rolls out.
The status is written only by the endpoint controller and carries the rollout's progress, so a
restarted operator resumes where it was.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import Field

from forgeline.spec._models import ADAPTER_NAME_PATTERN
from forgeline_operators.deploy.spec import KubernetesDeploySpec, RolloutSpec
from forgeline_operators.lib.kube_conditions import Condition, CrModel
from forgeline_operators.lib.kube_crd import PrinterColumn, crd, from_wire, to_wire

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "EndpointModel",
    "GateResult",
    "ModelEndpointSpec",
    "ModelEndpointStatus",
    "endpoint_crd",
    "from_cr",
    "revision_of",
    "to_cr",
    "validate_name",
]

GROUP = "forgeline.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelEndpoint"
PLURAL = "modelendpoints"
REVISION_LEN = 10
# Children are named ``NAME-REVISION`` and Services need a DNS-1035 label of at most 63 characters.
MAX_NAME = 63 - 1 - REVISION_LEN
_NAME_RE = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class EndpointModel(CrModel):
    uri: str = Field(
        description="Model (nim) or Triton model repository (triton) URI: s3://, gs://, pvc://, file://.",
        min_length=1,
    )
    sha256: str | None = Field(default=None, description="Content digest of `uri` (recorded, not fetched).")
    version: str | None = Field(default=None, description="Registry label, e.g. `quickstart-tiny-llama/3`.")
    adapters: dict[Annotated[str, Field(pattern=ADAPTER_NAME_PATTERN)], str] = Field(
        default_factory=dict, description="LoRA adapters served next to the model: name -> URI."
    )


class ModelEndpointSpec(CrModel):
    runtime: Literal["triton", "nim"] = Field(default="triton", description="Serving runtime.")
    model: EndpointModel = Field(description="What the endpoint serves.")
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec, description="How traffic moves to a new revision."
    )
    kubernetes: KubernetesDeploySpec = Field(
        default_factory=KubernetesDeploySpec,
        description="Pods: image, replicas, GPUs, placement, model source.",
    )


class GateResult(CrModel):
    step: int = Field(description="Index of the canary step the gate was checked after.")
    p95_ttft_ms: float | None = Field(default=None, description="Measured p95 time to first token (ms).")
    error_rate: float | None = Field(default=None, description="Measured share of failed requests.")
    passed: bool = Field(description="Whether every configured gate held.")
    reason: str = Field(
        default="", description="Which gate failed and by how much, or why none was measured."
    )
    at: str = Field(description="RFC 3339 time of the check.")


class ModelEndpointStatus(CrModel):
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"] = Field(
        default="Pending", description="Summary of the conditions."
    )
    observed_generation: int | None = Field(default=None, description="metadata.generation last acted on.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Progressing, Degraded.")
    current_revision: str | None = Field(default=None, description="Revision that serves (stable).")
    canary_revision: str | None = Field(default=None, description="Revision being rolled out, if any.")
    canary_step: int | None = Field(default=None, description="Index into rollout.steps of the canary.")
    step_started_at: str | None = Field(default=None, description="RFC 3339 start of the current step.")
    traffic_split: dict[str, int] = Field(default_factory=dict, description="Revision -> percent of traffic.")
    url: str | None = Field(default=None, description="In-cluster URL of the stable Service.")
    model_version: str | None = Field(default=None, description="`model.version` of the current revision.")
    last_gate: GateResult | None = Field(default=None, description="The last gate check.")
    rollback_reason: str | None = Field(default=None, description="Why the last canary was rolled back.")
    revisions: dict[str, str] = Field(
        default_factory=dict, description="Revision -> model URI, kept for rollback and audit."
    )


def revision_of(spec: ModelEndpointSpec) -> str:
    """First 10 hex of sha256 over the canonical JSON of what a pod runs (replica counts excluded)."""
    wire = to_wire(spec)
    kube = {k: v for k, v in wire.get("kubernetes", {}).items() if k not in ("replicas", "maxReplicas")}
    relevant = {"runtime": wire["runtime"], "model": wire["model"], "kubernetes": kube}
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:REVISION_LEN]


def validate_name(name: str) -> None:
    """Raise ValueError unless ``name`` can name an endpoint and, with a revision suffix, its children."""
    import re

    if not re.match(_NAME_RE, name) or len(name) > MAX_NAME:
        raise ValueError(
            f"endpoint name {name!r}: must be lowercase letters, digits and '-', start with a letter, end "
            f"alphanumeric, at most {MAX_NAME} characters (children are NAME-<10-char revision>); "
            "set `endpoint_name` on the deploy stage"
        )


def to_cr(name: str, spec: ModelEndpointSpec, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``ModelEndpoint`` object for ``spec`` (namespace from ``spec.kubernetes.namespace``)."""
    validate_name(name)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": spec.kubernetes.namespace,
            "labels": {"app.kubernetes.io/managed-by": "forgeline", **(labels or {})},
        },
        "spec": to_wire(spec),
    }


def from_cr(obj: dict[str, Any]) -> tuple[ModelEndpointSpec, ModelEndpointStatus]:
    """Spec and status models of a ``ModelEndpoint`` as read from the server (status may be absent)."""
    spec = from_wire(ModelEndpointSpec, obj.get("spec") or {})
    status = from_wire(ModelEndpointStatus, obj.get("status") or {})
    return spec, status


def endpoint_crd() -> dict[str, Any]:
    return crd(
        group=GROUP,
        version=VERSION,
        kind=KIND,
        plural=PLURAL,
        short_names=["me"],
        spec=ModelEndpointSpec,
        status=ModelEndpointStatus,
        columns=[
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Revision", ".status.currentRevision"),
            PrinterColumn("Traffic", ".status.trafficSplit"),
            PrinterColumn("URL", ".status.url"),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ],
        description="A served model on Kubernetes (Triton or NIM) and its rollout between revisions.",
    )
