"""The quantize stage's model: the format (ModelOpt or NNCF), calibration, its gate vs the parent and
the optional TRT-LLM checkpoint export. The operator's ``stage_model``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from forgeline.sdk import BASE_MODEL_REF, Ref, StageBase, StrictModel
from forgeline_operators.lib.specs import CalibrationSpec, QuantizeGate


class TrtllmExportSpec(StrictModel):
    tp: int = Field(default=1, ge=1, description="Tensor-parallel shards of the TRT-LLM checkpoint.")
    pp: int = Field(default=1, ge=1, description="Pipeline-parallel shards of the TRT-LLM checkpoint.")


class QuantizeStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("model",)
    outputs: ClassVar[tuple[str, ...]] = ("checkpoint", "trtllm_checkpoint")
    primary_output: ClassVar[str | None] = "checkpoint"

    kind: Literal["quantize"] = Field(description="Post-training quantization.")
    model: Ref = Field(default=BASE_MODEL_REF, description="Model to quantize.")
    format: Literal["fp8", "int8_sq", "int8", "int4_awq", "w4a8_awq", "nvfp4", "nncf_int8", "nncf_int4"] = (
        Field(description="ModelOpt format (fp8 ... nvfp4) or NNCF weight compression for the CPU runtime.")
    )
    kv_cache_dtype: Literal["fp8", "none"] = Field(default="none", description="Quantize the KV cache.")
    calibration: CalibrationSpec | None = Field(default=None, description="Calibration data.")
    gate: QuantizeGate = Field(default_factory=QuantizeGate, description="Quality gate vs the parent.")
    export_trtllm: TrtllmExportSpec | None = Field(
        default=None, description="Also export a TP/PP-sharded TRT-LLM checkpoint (legacy engine path)."
    )
    export_dtype: Literal["bf16", "fp16", "fp32"] | None = Field(
        default=None,
        description="dtype of a ModelOpt export's unquantized tensors (default bf16, what TRT-LLM expects).",
    )

    def refs(self) -> dict[str, str]:
        return {"model": self.model}

    def dataset_refs(self) -> dict[str, str]:
        out = {}
        if self.calibration:
            out["calibration.dataset"] = self.calibration.dataset
        if self.gate.dataset:
            out["gate.dataset"] = self.gate.dataset
        return out

    produces_model: ClassVar[bool] = True
