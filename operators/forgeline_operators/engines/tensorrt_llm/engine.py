"""The TensorRT-LLM engine object (:data:`ENGINE`, entry point ``forgeline.engines: tensorrt-llm``).

It owns the GPU runtime's choices as the :class:`~forgeline_operators.engines.Engine` protocol states
them. Its artifact is a build stage's ``engine: tensorrt-llm`` output (``build_spec.json`` +
``extra_llm_api_options.yaml``, :func:`is_trtllm_artifact`); ``prepare`` builds nothing (the engine is
built by the build stage, on a GPU) and passes an HF checkpoint through for the ``llmapi`` model.
What is served decides the layout: a build output holding a TensorRT engine (``trtllm-build`` form)
gets NVIDIA's ``inflight_batcher_llm`` ensemble over it; an LLM-API build profile or a plain HF
checkpoint gets the ``llmapi`` model (PyTorch backend, HF weights loaded directly, the build stage's
``extra_llm_api_options`` as its arguments). Only files are written: the repository runs in NVIDIA's
Triton TensorRT-LLM image on a GPU (untested here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forgeline.runtime.context import OperatorError
from forgeline_operators.engines import (
    EngineCapabilities,
    Repository,
    ServerRequirement,
    ServingSettings,
)
from forgeline_operators.engines.tensorrt_llm.repository import (
    TrtllmRepositorySpec,
    build_llmapi_repository,
    build_trtllm_repository,
)
from forgeline_operators.engines.tensorrt_llm.settings import TrtllmBuildSpec
from forgeline_operators.engines.tensorrt_llm.trtllm import llm_api_options

__all__ = ["ENGINE", "TensorrtLlmEngine", "is_trtllm_artifact"]

IMAGE = "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"  # the one deploy/manifests.py runs


def is_trtllm_artifact(path: Path) -> bool:
    """A build stage's ``engine: tensorrt-llm`` output (``build_spec.json`` from the build operator)."""
    return (path / "build_spec.json").is_file() and (path / "extra_llm_api_options.yaml").is_file()


def _is_hf_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "mapping" not in json.loads(config.read_text())


def _tokenizer_dir(candidates: list[Path]) -> Path:
    for path in candidates:
        if (path / "tokenizer.json").is_file():
            return path
    listed = ", ".join(str(p) for p in candidates)
    raise ValueError(f"no tokenizer.json next to the engine or its checkpoint (looked in {listed})")


class TensorrtLlmEngine:
    """NVIDIA's TensorRT-LLM Triton repositories (inflight_batcher_llm ensemble or llmapi model)."""

    name = "tensorrt-llm"
    server = ServerRequirement(
        name="tritonserver", backends=("tensorrtllm", "python"), runs_here=False, image=IMAGE
    )
    # LoRA and speculative decoding are built into the engine (build stage), not served from
    # ServingSettings: per-request LoRA weights go through lora_task_id / lora_weights / lora_config.
    capabilities = EngineCapabilities(devices=frozenset({"gpu"}), lora=False, speculative_decoding=False)

    def accepts(self, path: Path) -> bool:
        return is_trtllm_artifact(path)

    def prepare(self, model_dir: Path, work_dir: Path, threads: int = 1) -> Path:
        if self.accepts(model_dir) or _is_hf_checkpoint(model_dir):
            return model_dir
        raise OperatorError(
            f"{model_dir} is neither a build stage's `engine: tensorrt-llm` output nor an HF checkpoint: "
            "a TensorRT-LLM engine is built by the build stage (kind: build, engine: tensorrt-llm, on a "
            "GPU), never at serving time; serve that stage's `artifact` output"
        )

    def check(self, settings: ServingSettings) -> None:
        if settings.adapters or settings.draft is not None:
            raise ValueError(
                "serve on GPU (TensorRT-LLM): `adapters` and `speculative` are CPU-runtime settings. On "
                "GPU, build the engine with tensorrt_llm.lora / tensorrt_llm.speculative_decoding (build "
                "stage) and send LoRA weights per request (lora_task_id, lora_weights, lora_config)"
            )

    def write_repository(self, dest: Path, artifact: Path, settings: ServingSettings) -> Repository:
        self.check(settings)
        build: dict[str, Any] = {}
        if is_trtllm_artifact(artifact):
            build = json.loads((artifact / "build_spec.json").read_text())
        build_settings = TrtllmBuildSpec.model_validate(build.get("settings") or {})
        spec = TrtllmRepositorySpec(
            engine_dir=str(artifact / "engine"),
            max_batch_size=min(settings.scheduler.max_num_seqs, build_settings.max_batch_size),
            kv_cache_free_gpu_mem_fraction=build_settings.kv_cache_free_gpu_mem_fraction,
            enable_kv_cache_reuse=settings.scheduler.prefix_caching and build_settings.use_paged_context_fmha,
            lora=bool(build_settings.lora),
            lora_cache_max_adapter_size=int((build_settings.lora or {}).get("max_rank", 64)),
        )
        if build.get("trtllm_build"):
            checkpoint = Path(build.get("checkpoint", ""))
            tokenizer = _tokenizer_dir([artifact, checkpoint, checkpoint.parent])
            build_trtllm_repository(dest, spec, tokenizer)
            layout = "inflight_batcher_llm"
        else:
            model = build.get("checkpoint") or str(artifact)
            if not (Path(model) / "config.json").is_file():
                raise ValueError(f"{model} is not an HF checkpoint (no config.json) for the llmapi model")
            options = build.get("extra_llm_api_options") or llm_api_options(build_settings)
            build_llmapi_repository(dest, spec, model, options)
            layout = "llmapi"
        return Repository(dest, {"layout": layout, "max_batch_size": spec.max_batch_size})


ENGINE = TensorrtLlmEngine()
