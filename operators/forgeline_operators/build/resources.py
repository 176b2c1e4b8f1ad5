"""The ``EngineBuild`` custom resource (``forgeline.dev/v1alpha1``): spec and status models and its CRD.

The spec is the shape :func:`forgeline_operators.build.k8s.engine_build` writes (checkpoint path +
sha256, the stage's ``tensorrt_llm`` settings, the engine cache key, output path, image, GPUs and
placement); ``tensorrtLLM`` keeps the workflow's snake_case keys because the build Job hands it to the
build entrypoint unchanged. The status mirrors the entrypoint's termination-message JSON
(:mod:`.engine_job`): phase, engine path and sha256, cache hit/miss, or the failure's reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from forgeline_operators.engines.tensorrt_llm.settings import TrtllmBuildSpec
from forgeline_operators.lib.kube_conditions import Condition, CrModel
from forgeline_operators.lib.kube_crd import VERBATIM, PrinterColumn, crd, from_wire

__all__ = ["EngineBuildSpec", "EngineBuildStatus", "engine_build_crd", "from_cr"]


class CheckpointRef(CrModel):
    path: str = Field(description="Checkpoint directory on the artifact volume.", min_length=1)
    sha256: str = Field(description="Digest of the checkpoint (part of the engine cache key).")


class OutputRef(CrModel):
    path: str = Field(description="Where the engine directory is published.", min_length=1)


class EngineBuildSpec(CrModel):
    engine: Literal["tensorrt-llm"] = Field(default="tensorrt-llm", description="Engine to build.")
    checkpoint: CheckpointRef = Field(description="Checkpoint to build from.")
    tensorrt_llm: TrtllmBuildSpec = Field(
        alias="tensorrtLLM",
        description="Build settings, as the workflow's `tensorrt_llm` block (snake_case keys).",
        json_schema_extra={VERBATIM: True},
    )
    cache_key: str = Field(description="Engine cache key planned for these inputs.", min_length=1)
    output: OutputRef = Field(description="Output of the build.")
    image: str = Field(description="Container image of the build Job.")
    gpus: int = Field(default=1, ge=1, description="GPUs of the build (tp * pp).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector of the Job.")
    tolerations: list[dict[str, str | int]] = Field(
        default_factory=list, description="Tolerations of the Job."
    )


class EngineBuildStatus(CrModel):
    phase: Literal["Pending", "Running", "Succeeded", "Failed"] = Field(
        default="Pending", description="Where the build is."
    )
    observed_generation: int | None = Field(default=None, description="metadata.generation last acted on.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready (engine published), Failed.")
    job_name: str | None = Field(default=None, description="The build Job (none on a cache hit).")
    path: str | None = Field(default=None, description="Published engine directory.")
    sha256: str | None = Field(default=None, description="Digest of the published directory.")
    cache_key: str | None = Field(default=None, description="Engine cache key the build reported.")
    cache: Literal["hit", "miss", "none"] | None = Field(default=None, description="Engine cache outcome.")
    form: str | None = Field(
        default=None, description="`engine` (trtllm-build) or `llm-api` (HF checkpoint)."
    )
    engines: list[str] = Field(default_factory=list, description="Engine files (rank*.engine).")
    reason: str | None = Field(
        default=None, description="Failure reason (InvalidSpec, NoGPU, KeyMismatch...)."
    )
    message: str | None = Field(default=None, description="Failure message with the fix.")


def from_cr(obj: dict[str, Any]) -> tuple[EngineBuildSpec, EngineBuildStatus]:
    """Spec and status models of an ``EngineBuild`` as read from the server."""
    return from_wire(EngineBuildSpec, obj.get("spec") or {}), from_wire(
        EngineBuildStatus, obj.get("status") or {}
    )


def engine_build_crd() -> dict[str, Any]:
    return crd(
        group="forgeline.dev",
        version="v1alpha1",
        kind="EngineBuild",
        plural="enginebuilds",
        short_names=["eb"],
        spec=EngineBuildSpec,
        status=EngineBuildStatus,
        columns=[
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Cache", ".status.cache"),
            PrinterColumn("Engine", ".status.path"),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ],
        description="A TensorRT-LLM engine build on a GPU node; cache hit -> no Job.",
    )
