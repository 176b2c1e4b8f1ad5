"""``run(ctx)`` of the serve stage: a Triton model repository for the stage's model.

An OpenVINO IR (the build stage's ``engine: openvino`` output) is served as is; an HF checkpoint is
exported to an fp32 IR first, inside this stage. The repository holds one decoupled python model
named after the stage, over OpenVINO GenAI continuous batching with the stage's scheduler limits.
"""

from __future__ import annotations

import time

from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline_operators.serve.export import openvino_engine
from forgeline_operators.serve.repository import OpenvinoModelSpec, build_openvino_repository

__all__ = ["run"]


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    if ctx.workflow.resources.device == "gpu":
        raise OperatorError(
            "serve on GPU needs the TensorRT-LLM Triton backend image; this stage builds the CPU runtime "
            "(OpenVINO GenAI). Use forgeline_operators.serve.trtllm to render the GPU repository."
        )
    started = time.perf_counter()
    source = ctx.input_path(stage.model)
    engine, exported = openvino_engine(source, ctx.work_dir, threads=ctx.threads)
    export_s = time.perf_counter() - started
    if exported:
        ctx.logger.info(
            "exported %s to an fp32 OpenVINO IR in %.1fs (no build stage output given)", source, export_s
        )
    repo = ctx.output_dir / "repository"
    spec = OpenvinoModelSpec(
        name=stage.name.replace("-", "_"), scheduler=stage.scheduler, threads=ctx.threads
    )
    build_openvino_repository(repo, engine, spec)
    ctx.log_params(
        {
            "engine": "openvino",
            "exported_in_stage": exported,
            "max_num_seqs": stage.scheduler.max_num_seqs,
            "max_batched_tokens": stage.scheduler.max_batched_tokens,
            "prefix_caching": stage.scheduler.prefix_caching,
        }
    )
    return StageResult(outputs={"repository": repo}, metrics={"export_seconds": round(export_s, 3)})
