"""The TensorRT-LLM engine's build settings (a build stage's ``tensorrt_llm:``): parallelism, limits,
plugins, LoRA and speculative decoding, and the release and GPU the engine is for.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from forgeline.sdk import StrictModel


class TrtllmBuildSpec(StrictModel):
    tp: int = Field(default=1, ge=1, description="Tensor parallelism of the engine.")
    pp: int = Field(default=1, ge=1, description="Pipeline parallelism of the engine.")
    max_batch_size: int = Field(default=64, ge=1, description="Max sequences in flight.")
    max_input_len: int = Field(default=2048, ge=1, description="Max prompt tokens.")
    max_seq_len: int = Field(default=4096, ge=1, description="Max prompt + generated tokens.")
    max_num_tokens: int = Field(default=8192, ge=1, description="Max tokens per engine step.")
    paged_kv_cache: bool = Field(default=True, description="Paged KV cache.")
    use_paged_context_fmha: bool = Field(default=True, description="Paged context FMHA (prefix reuse).")
    gemm_plugin: str = Field(default="auto", description="GEMM plugin dtype or `auto`.")
    kv_cache_free_gpu_mem_fraction: float = Field(
        default=0.9, gt=0, le=1, description="GPU memory fraction for the KV cache."
    )
    lora: dict[str, int] | None = Field(default=None, description="LoRA support, e.g. {max_rank: 16}.")
    speculative_decoding: dict[str, Any] | None = Field(
        default=None, description="e.g. {mode: draft_tokens_external, max_draft_len: 4}."
    )
    version: str | None = Field(
        default=None,
        pattern=r"^\d+\.\d+(\.\S+)?$",
        description="TensorRT-LLM release the engine is for (e.g. 1.2); default: the installed one, or 1.2.",
    )
    gpu_arch: str | None = Field(
        default=None,
        pattern=r"^sm_\d{2,3}[a-z]?$",
        description="GPU architecture the engine is for (e.g. sm_90); default: the build node's GPU.",
    )
