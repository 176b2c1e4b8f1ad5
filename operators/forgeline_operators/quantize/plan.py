"""Plan hooks of the quantize, prune and distill kinds: GPUs (one for quantize on a GPU workflow;
prune and distill run on the CPU), memory estimates, and quantization formats that need CUDA.
Imports nothing heavy."""

from __future__ import annotations

from typing import Any

from forgeline.plan import (
    EstimateInputs,
    MemoryEstimate,
    ModelShape,
    StageEstimate,
    finetune_memory,
    inference_memory,
)
from forgeline.registry import Capabilities, ResourceRequest, StageIssue

__all__ = [
    "check_quantize",
    "distill_memory",
    "estimate_distill",
    "estimate_prune",
    "estimate_quantize",
    "resources_quantize",
]


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


def estimate_prune(stage: Any, shape: ModelShape, inputs: EstimateInputs) -> StageEstimate:
    # The model, its importance hooks' activations and the pruned copy (at most as large).
    memory = inference_memory(shape, "fp32", stage.calibration.max_seq_len, 1)
    memory.parts["pruned copy (<= weights)"] = shape.parameters * 4
    memory.per_device_bytes += shape.parameters * 4
    return StageEstimate(memory=memory)


def estimate_distill(stage: Any, shape: ModelShape, inputs: EstimateInputs) -> StageEstimate:
    return StageEstimate(
        memory=distill_memory(shape, stage.training.max_seq_len, stage.training.micro_batch_size)
    )


def distill_memory(shape: ModelShape, seq_len: int, micro_batch: int) -> MemoryEstimate:
    """Upper bound for a distill stage (fp32, CPU): the student trained as a full model no larger than
    the teacher (its shape is known only after pruning / layer copying), plus the frozen teacher."""
    est = finetune_memory(
        shape,
        "sft",
        precision="fp32",
        lora_r=None,
        lora_targets="all-linear",
        lora_for_dpo=False,
        double_quant=True,
        seq_len=seq_len,
        micro_batch=micro_batch,
        gradient_checkpointing=False,
        tp=1,
        pp=1,
    )
    est.parts["teacher (frozen) + its logits"] = shape.parameters * 4 + est.parts.get("logits", 0) // 2
    est.notes.append("student sized as the teacher (upper bound)")
    return MemoryEstimate(sum(est.parts.values()), est.parts, est.notes)
