"""Plan hooks of the prune kind: its memory estimate (it runs on the CPU, so it asks for no GPU).
Imports nothing heavy."""

from __future__ import annotations

from typing import Any

from forgeline.sdk import EstimateInputs, ModelShape, StageEstimate, inference_memory

__all__ = ["estimate"]


def estimate(stage: Any, shape: ModelShape, inputs: EstimateInputs) -> StageEstimate:
    # The model, its importance hooks' activations and the pruned copy (at most as large).
    memory = inference_memory(shape, "fp32", stage.calibration.max_seq_len, 1)
    memory.parts["pruned copy (<= weights)"] = shape.parameters * 4
    memory.per_device_bytes += shape.parameters * 4
    return StageEstimate(memory=memory)
