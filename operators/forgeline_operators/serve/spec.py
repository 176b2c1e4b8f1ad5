"""The serve stage's model: the model to serve, its batching limits, LoRA adapters by name and
speculative decoding. The operator's ``stage_model``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from forgeline.sdk import ADAPTER_NAME_PATTERN, Ref, SpecContext, SpecIssue, StageBase, StrictModel
from forgeline_operators.engines import SchedulerSpec, bf16_thread_issues


class SpeculativeSpec(StrictModel):
    draft: Ref = Field(
        description="Draft model sharing the served model's tokenizer (an OpenVINO IR or HF checkpoint)."
    )
    num_assistant_tokens: int = Field(
        default=5, ge=1, le=32, description="Tokens the draft proposes per step; the target checks them."
    )


class ServeStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("model",)
    outputs: ClassVar[tuple[str, ...]] = ("repository",)
    primary_output: ClassVar[str | None] = "repository"

    kind: Literal["serve"] = Field(description="Build a Triton model repository for the model.")
    runtime: Literal["triton"] = Field(default="triton", description="Inference server.")
    model: Ref = Field(description="Built artifact or registered version to serve.")
    engine: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description=(
            "Serving engine (an installed `forgeline.engines` entry point: `openvino`, `tensorrt-llm`, "
            "...). Default: the engine whose artifact `model` is (a build stage's output), else the one "
            "engine that runs on the workflow's device; `forgeline plan` shows which."
        ),
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Batching limits.")
    adapters: dict[Annotated[str, Field(pattern=ADAPTER_NAME_PATTERN)], Ref] = Field(
        default_factory=dict,
        description=(
            "LoRA adapters served by name (the `model` id in OpenAI requests), e.g. "
            "`{sql: ${stages.sft.outputs.adapter}}`; scale lora_alpha / r from each adapter_config.json."
        ),
    )
    speculative: SpeculativeSpec | None = Field(
        default=None, description="Speculative decoding with a draft model (CPU runtime)."
    )

    def refs(self) -> dict[str, str]:
        out = {"model": self.model}
        out.update({f"adapters.{name}": ref for name, ref in sorted(self.adapters.items())})
        if self.speculative is not None:
            out["speculative.draft"] = self.speculative.draft
        return out

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        return bf16_thread_issues(self.scheduler, "scheduler.inference_precision", self, ctx)
