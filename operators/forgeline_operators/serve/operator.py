"""``run(ctx)`` of the serve stage: a Triton model repository for the stage's model.

On ``resources.device: gpu``, or for a build stage's ``engine: tensorrt-llm`` output, the repository
is TensorRT-LLM's (:mod:`.trtllm_stage`). Otherwise it is the CPU runtime: an OpenVINO IR (the build
stage's ``engine: openvino`` output) is served as is; an HF checkpoint is exported to an fp32 IR
first, inside this stage. The repository holds one decoupled python model named after the stage,
over OpenVINO GenAI continuous batching with the stage's scheduler limits. LoRA adapters
(``adapters:``) are served by name at ``lora_alpha / r``; a ``speculative.draft`` model is exported
like the served model and verified by it ``num_assistant_tokens`` at a time.
"""

from __future__ import annotations

import time

from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline_operators.serve.export import openvino_engine
from forgeline_operators.serve.repository import (
    AdapterRef,
    OpenvinoModelSpec,
    SpeculativeRef,
    adapter_ref,
    build_openvino_repository,
)
from forgeline_operators.serve.trtllm_stage import is_trtllm_artifact, run_trtllm

__all__ = ["run"]


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    source = ctx.input_path(stage.model)
    if ctx.workflow.resources.device == "gpu" or is_trtllm_artifact(source):
        return run_trtllm(ctx)
    started = time.perf_counter()
    engine, exported = openvino_engine(source, ctx.work_dir, threads=ctx.threads)
    export_s = time.perf_counter() - started
    if exported:
        ctx.logger.info(
            "exported %s to an fp32 OpenVINO IR in %.1fs (no build stage output given)", source, export_s
        )
    name = stage.name.replace("-", "_")
    adapters = _adapters(ctx, name)
    speculative = None
    if stage.speculative is not None:
        draft_src = ctx.input_path(stage.speculative.draft)
        if draft_src.resolve() == source.resolve():  # self-drafting: reuse the export
            draft = engine
        else:
            (ctx.work_dir / "draft").mkdir(exist_ok=True)
            draft, _ = openvino_engine(draft_src, ctx.work_dir / "draft", threads=ctx.threads)
        speculative = SpeculativeRef(draft, stage.speculative.num_assistant_tokens)
    repo = ctx.output_dir / "repository"
    spec = OpenvinoModelSpec(
        name=name,
        scheduler=stage.scheduler,
        threads=ctx.threads,
        adapters=adapters,
        speculative=speculative,
    )
    try:
        build_openvino_repository(repo, engine, spec)
    except ValueError as e:
        raise OperatorError(f"serve stage {stage.name!r}: {e}") from None
    ctx.log_params(
        {
            "engine": "openvino",
            "exported_in_stage": exported,
            "max_num_seqs": stage.scheduler.max_num_seqs,
            "max_batched_tokens": stage.scheduler.max_batched_tokens,
            "prefix_caching": stage.scheduler.prefix_caching,
            "inference_precision": stage.scheduler.inference_precision,
            "kv_cache_precision": stage.scheduler.engine_kv_cache_precision,
            "engine_threads": ctx.threads,
            "adapters": ",".join(sorted(adapters)),
            "lora_scales": ",".join(f"{n}={a.alpha:g}" for n, a in sorted(adapters.items())),
            "num_assistant_tokens": speculative.num_assistant_tokens if speculative else 0,
        }
    )
    return StageResult(outputs={"repository": repo}, metrics={"export_seconds": round(export_s, 3)})


def _adapters(ctx: StageContext, served: str) -> dict[str, AdapterRef]:
    out: dict[str, AdapterRef] = {}
    for name, ref in sorted(ctx.stage.adapters.items()):
        if name == served:
            raise OperatorError(
                f"adapter name {name!r} is the served model's own name; rename the adapter under `adapters:`"
            )
        try:
            out[name] = adapter_ref(ctx.input_path(ref))
        except (ValueError, KeyError) as e:
            raise OperatorError(f"adapter {name!r} ({ref}): {e}") from None
    return out
