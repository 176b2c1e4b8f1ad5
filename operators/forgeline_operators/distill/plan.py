"""Plan hooks of the distill kind: its memory estimate (it runs on the CPU, so it asks for no GPU).
Imports nothing heavy."""

from __future__ import annotations

from typing import Any

from forgeline.sdk import EstimateInputs, MemoryEstimate, ModelShape, StageEstimate, finetune_memory

__all__ = ["distill_memory", "estimate"]


def estimate(stage: Any, shape: ModelShape, inputs: EstimateInputs) -> StageEstimate:
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
