"""The promote stage's model and the promotion settings ``forgeline promote`` and the REST API share:
metric, quantization and SLO gates, approval, and the production endpoint. The operator's
``stage_model``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from forgeline.sdk import (
    ALIAS_PATTERN,
    NAME_PATTERN,
    REGISTERED_NAME_PATTERN,
    Ref,
    SpecContext,
    SpecIssue,
    StageBase,
    StrictModel,
)
from forgeline_operators.engines import SchedulerSpec, bf16_thread_issues


class MetricGate(StrictModel):
    metric: str = Field(description="Metric recorded on the version, e.g. `token_accuracy`, `perplexity`.")
    stage: str | None = Field(
        default=None,
        description="Evaluate stage whose metric it is (default: the only upstream stage that logged it).",
    )
    vs: Literal["production", "parent"] = Field(
        default="production",
        description=(
            "Compare with the current production version's value, or with the parent model's value "
            "measured by the same evaluate stage (`baseline_<metric>`)."
        ),
    )
    max_regression: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Largest relative change for the worse allowed (0.02 = 2 %), checked at the worst end of the "
            "paired bootstrap interval when both sides were scored on the same rows (per-row scores of "
            "the evaluate stage on both versions, or the stage's own comparison with the parent); "
            "otherwise on the point values, and the gate's message says so."
        ),
    )
    confidence: float = Field(
        default=0.95, gt=0.5, lt=1, description="Level of the paired interval vs production."
    )


class QuantizationGate(StrictModel):
    max_perplexity_increase: float | None = Field(
        default=None,
        ge=0,
        description="Largest relative perplexity increase of the quantize stage vs parent.",
    )
    min_token_agreement: float | None = Field(
        default=None, ge=0, le=1, description="Smallest greedy-token agreement with the parent."
    )


class SloGate(StrictModel):
    p95_ttft_ms: float | None = Field(default=None, gt=0, description="Max p95 time to first token (ms).")
    min_tokens_per_s: float | None = Field(
        default=None, gt=0, description="Min output tokens per second at `concurrency`."
    )
    max_error_rate: float = Field(default=0.0, ge=0, le=1, description="Max share of failed requests.")
    concurrency: int = Field(default=4, ge=1, le=256, description="Concurrent requests of the benchmark.")
    requests: int = Field(default=16, ge=1, le=10_000, description="Requests of the benchmark.")
    max_tokens: int = Field(default=16, ge=1, le=4096, description="Output tokens per request (max).")


class PromotionGates(StrictModel):
    metrics: list[MetricGate] = Field(
        default_factory=list, description="Evaluation metrics vs production or the parent."
    )
    quantization: QuantizationGate | None = Field(
        default=None, description="Quality delta of the quantize stage (read from the version's tags)."
    )
    slo: SloGate | None = Field(
        default=None, description="A short benchmark against a candidate endpoint serving the version."
    )
    approval: bool = Field(
        default=False, description="Require `forgeline approve MODEL --version N` before promotion."
    )


class PromoteEndpointSpec(StrictModel):
    name: str = Field(description="Name of the production endpoint.", pattern=NAME_PATTERN)
    target: Literal["local", "kubernetes"] | None = Field(
        default=None,
        description=(
            "`local`: a tritonserver on this machine, started or hot-swapped; `kubernetes`: the "
            "`ModelEndpoint` of that name, rolled out per its strategy (default: the workflow's target)."
        ),
    )
    namespace: str = Field(default="default", description="Namespace of the ModelEndpoint (kubernetes).")
    port: int | None = Field(default=None, ge=1, le=65535, description="Local port when it starts.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Batching limits (local).")
    timeout_s: float = Field(default=900, gt=0, description="Deadline for the endpoint to serve the version.")


class PromoteStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("version", "candidate_endpoint")
    outputs: ClassVar[tuple[str, ...]] = ("version", "endpoint")
    primary_output: ClassVar[str | None] = "version"
    value_outputs: ClassVar[frozenset[str]] = frozenset({"version", "endpoint"})

    kind: Literal["promote"] = Field(description="Move a registry alias after gates pass.")
    registered_name: str = Field(description="Registered model name.", pattern=REGISTERED_NAME_PATTERN)
    version: Ref | None = Field(
        default=None,
        description="Version to promote, e.g. `${stages.register.outputs.version}` (default: `from_alias`).",
    )
    from_alias: str = Field(
        default="candidate", description="Alias whose version is promoted.", pattern=ALIAS_PATTERN
    )
    to_alias: str = Field(default="production", description="Alias to move.", pattern=ALIAS_PATTERN)
    requires: list[str] = Field(
        default_factory=list, description="Stages whose gates must have passed (they become dependencies)."
    )
    gates: PromotionGates = Field(
        default_factory=PromotionGates, description="Checked before the alias moves."
    )
    endpoint: PromoteEndpointSpec | None = Field(
        default=None,
        description="Production endpoint pointed at the version (started if not running, else hot-swapped).",
    )
    candidate_endpoint: Ref | None = Field(
        default=None,
        description="Endpoint serving the version (SLO gate), e.g. `${stages.deploy.outputs.endpoint}`.",
    )

    def refs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.version is not None:
            out["version"] = self.version
        if self.candidate_endpoint is not None:
            out["candidate_endpoint"] = self.candidate_endpoint
        return out

    def extra_needs(self) -> list[str]:
        return list(self.requires)

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        issues = []
        for j, req in enumerate(self.requires):
            if req == self.name:
                issues.append(SpecIssue(f"requires[{j}]", "a stage cannot require itself"))
            elif req not in ctx.stages:
                issues.append(ctx.unknown_stage(f"requires[{j}]", req))
        for j, gate in enumerate(self.gates.metrics):
            if gate.stage is not None and gate.stage not in ctx.stages:
                issues.append(ctx.unknown_stage(f"gates.metrics[{j}].stage", gate.stage))
        if self.endpoint is not None:
            issues += bf16_thread_issues(
                self.endpoint.scheduler, "endpoint.scheduler.inference_precision", self, ctx
            )
        return issues
