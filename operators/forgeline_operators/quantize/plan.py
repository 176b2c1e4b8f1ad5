"""Plan hooks of the quantize kind: one GPU on a GPU workflow, its memory estimate, and the
quantization formats that need CUDA. Imports nothing heavy."""

from __future__ import annotations

from typing import Any

from forgeline.plan import (
    EstimateInputs,
    ModelShape,
    StageEstimate,
    inference_memory,
)
from forgeline.registry import Capabilities, ResourceRequest, StageIssue

__all__ = ["check_quantize", "estimate_quantize", "resources_quantize"]


def resources_quantize(stage: Any, workflow: Any, caps: Capabilities) -> ResourceRequest:
    return ResourceRequest(gpus=1)


def estimate_quantize(stage: Any, shape: ModelShape, inputs: EstimateInputs) -> StageEstimate:
    seq = stage.calibration.max_seq_len if stage.calibration else 256
    precision = "fp32" if inputs.device == "cpu" else "bf16"
    return StageEstimate(memory=inference_memory(shape, precision, seq, 1))


def check_quantize(stage: Any, workflow: Any, caps: Capabilities) -> list[StageIssue]:
    if workflow.resources.device == "cpu" and stage.format in caps.gpu_only_options:
        return [
            StageIssue(
                f"format {stage.format!r} needs CUDA", field="format", hint="set resources.device: gpu"
            )
        ]
    return []
