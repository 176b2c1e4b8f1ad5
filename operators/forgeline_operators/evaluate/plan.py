"""Plan hooks of the evaluate kind: one GPU on a GPU workflow, and the memory of scoring a batch
(fp32 on CPU, bf16 on GPU). Imports nothing heavy."""

from __future__ import annotations

from typing import Any

from forgeline.plan import EstimateInputs, ModelShape, StageEstimate, inference_memory
from forgeline.registry import Capabilities, ResourceRequest

__all__ = ["estimate", "resources"]


def resources(stage: Any, workflow: Any, caps: Capabilities) -> ResourceRequest:
    return ResourceRequest(gpus=1)


def estimate(stage: Any, shape: ModelShape, inputs: EstimateInputs) -> StageEstimate:
    precision = "fp32" if inputs.device == "cpu" else "bf16"
    return StageEstimate(memory=inference_memory(shape, precision, stage.max_seq_len, stage.batch_size))
