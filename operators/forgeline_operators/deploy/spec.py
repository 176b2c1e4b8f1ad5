"""The deploy stage's model: runtime (triton, nim), the endpoint's name and port, the rollout
strategy and gates, and the Kubernetes settings of the endpoint. The operator's ``stage_model``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from forgeline.sdk import DNS_LABEL_PATTERN, NAME_PATTERN, Ref, StageBase, StrictModel


class RolloutGates(StrictModel):
    p95_ttft_ms: float | None = Field(default=None, gt=0, description="Max p95 time to first token.")
    error_rate: float | None = Field(default=None, ge=0, le=1, description="Max error rate.")


class RolloutSpec(StrictModel):
    strategy: Literal["rolling", "canary"] = Field(default="rolling", description="Rollout strategy.")
    steps: list[int] = Field(default_factory=lambda: [100], description="Canary traffic percentages.")
    gates: RolloutGates = Field(default_factory=RolloutGates, description="Checked between steps.")
    step_interval_s: int = Field(
        default=60, ge=1, le=86400, description="Observation window per canary step (s)."
    )
    max_surge_gpus: int | None = Field(
        default=None, ge=1, description="GPUs the canary may add (default: one replica's)."
    )

    @field_validator("steps")
    @classmethod
    def _steps_increase_to_100(cls, v: list[int]) -> list[int]:
        if not v or any(not 0 < p <= 100 for p in v):
            raise ValueError(f"steps {v}: each must be a percentage in 1..100, e.g. [10, 50, 100]")
        if v[-1] != 100 or any(b <= a for a, b in zip(v, v[1:], strict=False)):  # noqa: RUF007
            raise ValueError(f"steps {v}: must increase strictly and end at 100, e.g. [10, 50, 100]")
        return v


class RepositorySourceSpec(StrictModel):
    pvc: str | None = Field(default=None, description="PVC holding the model repository.")
    path: str = Field(default="", description="Directory of the repository inside the PVC.")
    uri: str | None = Field(
        default=None, description="Object-store URI (s3://, gs://) an init container copies from."
    )

    @model_validator(mode="after")
    def _one_source(self) -> RepositorySourceSpec:
        if (self.pvc is None) == (self.uri is None):
            raise ValueError("repository: set exactly one of `pvc` (with `path`) or `uri`")
        return self


class KubernetesDeploySpec(StrictModel):
    namespace: str = Field(
        default="default", description="Namespace of the endpoint.", pattern=DNS_LABEL_PATTERN
    )
    image: str | None = Field(default=None, description="Server image (default: the runtime's pinned image).")
    replicas: int = Field(default=1, ge=0, description="Replicas of the serving revision.")
    max_replicas: int | None = Field(
        default=None, ge=1, description="HPA ceiling (Triton queue time; default: replicas)."
    )
    gpus: int = Field(default=1, ge=0, description="`nvidia.com/gpu` per replica.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod node selector.")
    tolerations: list[dict[str, str | int]] = Field(
        default_factory=list, description="Pod tolerations (Kubernetes shape: key, operator, value, effect)."
    )
    cpu: str = Field(default="4", description="CPU request per replica (Kubernetes quantity).")
    memory: str = Field(default="32Gi", description="Memory request per replica (Kubernetes quantity).")
    repository: RepositorySourceSpec | None = Field(
        default=None, description="Where pods read the model from (default: `uri` = the resolved model URI)."
    )
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="Type of the endpoint's stable Service."
    )
    metrics_url: str | None = Field(
        default=None, description="Prometheus base URL for rollout gates (default: scrape the canary pods)."
    )
    gateway: str | None = Field(
        default=None, description="Gateway (`NAME` or `NAMESPACE/NAME`) the weighted HTTPRoute attaches to."
    )


class DeployStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("repository",)
    outputs: ClassVar[tuple[str, ...]] = ("endpoint",)
    primary_output: ClassVar[str | None] = "endpoint"
    value_outputs: ClassVar[frozenset[str]] = frozenset({"endpoint"})

    kind: Literal["deploy"] = Field(description="Roll out an endpoint serving a model repository.")
    runtime: Literal["triton", "nim"] = Field(default="triton", description="Serving runtime.")
    repository: Ref = Field(description="Model repository (serve stage output) or model to serve (nim).")
    endpoint_name: str | None = Field(
        default=None, description="Endpoint name (default: workflow name).", pattern=NAME_PATTERN
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="Local port (local target).")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="How traffic moves over.")
    kubernetes: KubernetesDeploySpec | None = Field(
        default=None, description="Cluster settings of the endpoint (workflow `target: kubernetes`)."
    )

    def refs(self) -> dict[str, str]:
        return {"repository": self.repository}

    def backend_name(self) -> str | None:
        return self.runtime
