"""Plan hooks of the finetune kind (every backend): GPUs = tp x pp x dp, one Ray Train worker per rank
for backends that start their own, the memory / FLOPs estimate of the method, and the parallel
layouts the backend cannot run. Imports nothing heavy: ``plan`` calls these without torch."""

from __future__ import annotations

from typing import Any

from forgeline.plan import (
    EstimateInputs,
    ModelShape,
    StageEstimate,
    dataset_size,
    finetune_memory,
    training_flops,
)
from forgeline.registry import Capabilities, ResourceRequest, StageIssue

__all__ = ["check", "estimate", "resources"]


def resources(stage: Any, workflow: Any, caps: Capabilities) -> ResourceRequest:
    world = stage.parallelism.world_size
    return ResourceRequest(
        gpus=world,
        workers=world if caps.spawns_workers and world > 1 else 0,
        # A nemo container job runs on the cluster's GPUs; its local task only submits and waits.
        remote=workflow.target == "kubernetes" and stage.backend == "nemo",
    )


def estimate(stage: Any, shape: ModelShape, inputs: EstimateInputs) -> StageEstimate:
    t, par = stage.training, stage.parallelism
    memory = finetune_memory(
        shape,
        stage.method,
        precision=t.precision,
        lora_r=stage.lora.r if stage.lora else None,
        lora_targets=stage.lora.target_modules if stage.lora else "all-linear",
        lora_for_dpo=stage.lora is not None,
        double_quant=stage.qlora.double_quant if stage.qlora else True,
        seq_len=t.max_seq_len,
        micro_batch=t.micro_batch_size,
        gradient_checkpointing=t.gradient_checkpointing,
        tp=par.tp,
        pp=par.pp,
        fp32_grads=stage.backend == "megatron",
    )
    rows, nbytes = dataset_size(inputs.dataset_path(stage.dataset))
    per_row = min(t.max_seq_len, max(1, nbytes // max(rows, 1) // 4))  # ~4 bytes per token
    tokens = int(rows * per_row * t.epochs)
    if t.max_steps:
        tokens = min(tokens, t.max_steps * t.micro_batch_size * t.grad_accum * par.dp * per_row)
    flops = training_flops(shape.parameters, tokens, stage.method, stage.uses_adapter)
    return StageEstimate(memory=memory, tokens=tokens, flops=flops)


def check(stage: Any, workflow: Any, caps: Capabilities) -> list[StageIssue]:
    par = stage.parallelism
    issues = []
    for degree, ok, label in (
        (par.tp, caps.tensor_parallel, "tp"),
        (par.pp, caps.pipeline_parallel, "pp"),
        (par.dp, caps.data_parallel, "dp"),
    ):
        if degree > 1 and not ok:
            issues.append(
                StageIssue(
                    f"backend {stage.backend!r} does not support {label} > 1",
                    field=f"parallelism.{label}",
                    hint="use backend: megatron (or nemo) for tensor/pipeline parallelism"
                    if label in ("tp", "pp")
                    else None,
                )
            )
    return issues
