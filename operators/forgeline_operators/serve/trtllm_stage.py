"""The serve stage on the GPU runtime: the TensorRT-LLM Triton repository for the stage's model.

What is served decides the layout: a build stage's ``engine: tensorrt-llm`` output holding a TensorRT
engine (``trtllm-build`` form) gets NVIDIA's ``inflight_batcher_llm`` ensemble over it; an LLM-API
build profile or a plain HF checkpoint gets the ``llmapi`` model (PyTorch backend, HF weights loaded
directly, the build stage's ``extra_llm_api_options`` as its arguments). Only files are written: the
repository runs in NVIDIA's Triton TensorRT-LLM image on a GPU (untested here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline.spec._models import TrtllmBuildSpec
from forgeline_operators.serve.trtllm_repository import (
    TrtllmRepositorySpec,
    build_llmapi_repository,
    build_trtllm_repository,
)

__all__ = ["is_trtllm_artifact", "run_trtllm"]


def is_trtllm_artifact(path: Path) -> bool:
    """A build stage's ``engine: tensorrt-llm`` output (``build_spec.json`` from the build operator)."""
    return (path / "build_spec.json").is_file() and (path / "extra_llm_api_options.yaml").is_file()


def _tokenizer_dir(candidates: list[Path]) -> Path:
    for path in candidates:
        if (path / "tokenizer.json").is_file():
            return path
    listed = ", ".join(str(p) for p in candidates)
    raise OperatorError(f"no tokenizer.json next to the engine or its checkpoint (looked in {listed})")


def run_trtllm(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    if stage.adapters or stage.speculative is not None:
        raise OperatorError(
            "serve on GPU (TensorRT-LLM): `adapters` and `speculative` are CPU-runtime settings. On GPU, "
            "build the engine with tensorrt_llm.lora / tensorrt_llm.speculative_decoding (build stage) "
            "and send LoRA weights per request (lora_task_id, lora_weights, lora_config)"
        )
    source = ctx.input_path(stage.model)
    build: dict[str, Any] = {}
    if is_trtllm_artifact(source):
        build = json.loads((source / "build_spec.json").read_text())
    settings = TrtllmBuildSpec.model_validate(build.get("settings") or {})
    spec = TrtllmRepositorySpec(
        engine_dir=str(source / "engine"),
        max_batch_size=min(stage.scheduler.max_num_seqs, settings.max_batch_size),
        kv_cache_free_gpu_mem_fraction=settings.kv_cache_free_gpu_mem_fraction,
        enable_kv_cache_reuse=stage.scheduler.prefix_caching and settings.use_paged_context_fmha,
        lora=bool(settings.lora),
        lora_cache_max_adapter_size=int((settings.lora or {}).get("max_rank", 64)),
    )
    repo = ctx.output_dir / "repository"
    if build.get("trtllm_build"):
        checkpoint = Path(build.get("checkpoint", ""))
        tokenizer = _tokenizer_dir([source, checkpoint, checkpoint.parent])
        build_trtllm_repository(repo, spec, tokenizer)
        layout = "inflight_batcher_llm"
    else:
        from forgeline_operators.lib.trtllm import llm_api_options

        model = build.get("checkpoint") or str(source)
        if not (Path(model) / "config.json").is_file():
            raise OperatorError(f"{model} is not an HF checkpoint (no config.json) for the llmapi model")
        options = build.get("extra_llm_api_options") or llm_api_options(settings)
        build_llmapi_repository(repo, spec, model, options)
        layout = "llmapi"
    ctx.log_params({"engine": "tensorrt-llm", "layout": layout, "max_batch_size": spec.max_batch_size})
    ctx.logger.info("rendered the TensorRT-LLM %s repository (runs in the Triton TRT-LLM GPU image)", layout)
    return StageResult(outputs={"repository": repo}, metrics={})
