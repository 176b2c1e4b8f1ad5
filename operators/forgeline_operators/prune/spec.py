"""The prune stage's model: the pruned shape (MLP width, heads, depth) and the calibration data the
importance scores come from. The operator's ``stage_model``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from forgeline.sdk import BASE_MODEL_REF, Ref, SpecContext, SpecIssue, StageBase, StrictModel
from forgeline_operators.lib.specs import CalibrationSpec


class PruneSpec(StrictModel):
    intermediate_size: int | None = Field(
        default=None, ge=1, description="MLP intermediate size to keep (the most important channels)."
    )
    num_attention_heads: int | None = Field(
        default=None,
        ge=1,
        description="Query heads to keep; a multiple of num_key_value_heads (the same count per GQA group).",
    )
    num_hidden_layers: int | None = Field(
        default=None, ge=1, description="Decoder layers to keep (the least important are dropped)."
    )

    @model_validator(mode="after")
    def _something(self) -> PruneSpec:
        if (
            self.intermediate_size is None
            and self.num_attention_heads is None
            and self.num_hidden_layers is None
        ):
            raise ValueError("set at least one of intermediate_size, num_attention_heads, num_hidden_layers")
        return self


class PruneStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("model",)
    outputs: ClassVar[tuple[str, ...]] = ("checkpoint",)
    primary_output: ClassVar[str | None] = "checkpoint"

    kind: Literal["prune"] = Field(
        description="Structured pruning (width and depth) by activation importance."
    )
    model: Ref = Field(default=BASE_MODEL_REF, description="Model to prune.")
    target: PruneSpec = Field(description="The pruned shape: any of MLP width, attention heads, depth.")
    calibration: CalibrationSpec = Field(description="Data the importance scores are computed on.")
    eval_dataset: str | None = Field(
        default=None,
        description="Held-out dataset for perplexity before/after (default: the calibration rows not used).",
    )

    def refs(self) -> dict[str, str]:
        return {"model": self.model}

    def dataset_refs(self) -> dict[str, str]:
        out = {"calibration.dataset": self.calibration.dataset}
        if self.eval_dataset:
            out["eval_dataset"] = self.eval_dataset
        return out

    produces_model: ClassVar[bool] = True

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        # Distillation and pruning score token sequences: preference pairs have no single one.
        return self._dataset_formats(ctx, ("sft", "text"), f"{self.kind} needs")
