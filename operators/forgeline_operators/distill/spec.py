"""The distill stage's model: teacher, student (a model or a shape cut from the teacher), loss
weights and optimisation settings. The operator's ``stage_model``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from forgeline.sdk import BASE_MODEL_REF, Ref, SpecContext, SpecIssue, StageBase, StrictModel
from forgeline_operators.lib.specs import TrainingSpec


class StudentShapeSpec(StrictModel):
    num_hidden_layers: int = Field(
        ge=1, description="Decoder layers of the student, copied from the teacher."
    )
    layers: list[int] | None = Field(
        default=None,
        description="Teacher layer indices to copy, in order (default: evenly spaced, first and last kept).",
    )

    @model_validator(mode="after")
    def _layers_match(self) -> StudentShapeSpec:
        if self.layers is not None and len(self.layers) != self.num_hidden_layers:
            raise ValueError(
                f"`layers` lists {len(self.layers)} indices but num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError("`layers` repeats a teacher layer index")
        return self


class DistillSpec(StrictModel):
    temperature: float = Field(default=2.0, gt=0, description="Softmax temperature T of both models' logits.")
    kl_weight: float = Field(
        default=1.0, ge=0, description="Weight of KL(teacher || student) on T-scaled logits, times T²."
    )
    hard_label_weight: float = Field(
        default=0.0, ge=0, description="Weight of the cross-entropy on the dataset's tokens (0: soft only)."
    )

    @model_validator(mode="after")
    def _some_loss(self) -> DistillSpec:
        if self.kl_weight == 0 and self.hard_label_weight == 0:
            raise ValueError("kl_weight and hard_label_weight are both 0: nothing to train on")
        return self


class DistillStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("teacher", "student")
    dataset_fields: ClassVar[tuple[str, ...]] = ("dataset", "eval_dataset")
    outputs: ClassVar[tuple[str, ...]] = ("checkpoint",)
    primary_output: ClassVar[str | None] = "checkpoint"

    kind: Literal["distill"] = Field(description="Train a smaller student on the teacher's soft targets.")
    teacher: Ref = Field(
        default=BASE_MODEL_REF, description="The teacher model (default: the workflow model)."
    )
    student: Ref | StudentShapeSpec = Field(
        description=(
            "The student: a model reference (e.g. a prune stage's checkpoint), or a shape derived from "
            "the teacher, e.g. `{num_hidden_layers: 1}` (layers copied from the teacher)."
        )
    )
    dataset: str = Field(description="Name of a dataset under `data:` (format sft or text).")
    eval_dataset: str | None = Field(
        default=None, description="Held-out dataset for loss, perplexity and KL (default: a split)."
    )
    distill: DistillSpec = Field(default_factory=DistillSpec, description="Loss settings.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")

    @model_validator(mode="after")
    def _supported_training(self) -> DistillStage:
        if self.training.checkpoint_every_steps is not None:
            raise ValueError("distill does not checkpoint mid-run; drop training.checkpoint_every_steps")
        return self

    def refs(self) -> dict[str, str]:
        out = {"teacher": self.teacher}
        if isinstance(self.student, str):
            out["student"] = self.student
        return out

    produces_model: ClassVar[bool] = True

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        # Distillation and pruning score token sequences: preference pairs have no single one.
        return self._dataset_formats(ctx, ("sft", "text"), f"{self.kind} needs")
