"""Batching limits of a serving engine (``scheduler:`` of a serve stage, a promote stage's local
endpoint and ``forgeline serve``), and the CPU runtime's bf16 thread rule checked on them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from forgeline.sdk import SpecContext, SpecIssue, StageBase, StrictModel


class SchedulerSpec(StrictModel):
    max_num_seqs: int = Field(default=64, ge=1, description="Max sequences batched together.")
    max_batched_tokens: int = Field(default=1024, ge=1, description="Max tokens per engine step.")
    prefix_caching: bool = Field(default=True, description="Reuse KV blocks of shared prefixes.")
    kv_cache_gb: float | None = Field(default=None, gt=0, description="KV cache size (GiB).")
    kv_cache_precision: Literal["f32", "u8"] = Field(
        default="f32",
        description=(
            "KV cache element type (CPU runtime). `f32`: greedy output equals transformers' exactly; "
            "`u8`: OpenVINO's quantized cache, ~4x the tokens per GiB and faster steps, outputs may "
            "differ slightly. Under `inference_precision: bf16` the cache is bf16."
        ),
    )
    inference_precision: Literal["f32", "bf16"] = Field(
        default="f32",
        description=(
            "Engine compute precision (CPU runtime). `f32`: greedy output equals transformers' exactly; "
            "`bf16`: ~1.9x the tokens/s on CPUs with AMX / AVX512-BF16 (on others OpenVINO computes in "
            "f32), bf16 KV cache, outputs may differ slightly. bf16 needs 2+ engine threads (the stage's "
            "`resources.cpus`): OpenVINO 2026.4 crashes building a one-thread bf16 pipeline."
        ),
    )

    @property
    def engine_kv_cache_precision(self) -> str:
        """The KV cache the CPU engine gets: bf16 under bf16 inference (the plugin accepts no other)."""
        return self.kv_cache_precision if self.inference_precision == "f32" else "bf16"

    @model_validator(mode="after")
    def _kv_under_bf16(self) -> SchedulerSpec:
        if self.inference_precision == "bf16" and self.kv_cache_precision == "u8":
            raise ValueError(
                "kv_cache_precision 'u8' needs inference_precision 'f32' (OpenVINO's CPU plugin keeps "
                "a bf16 cache under bf16 inference); drop kv_cache_precision or use f32"
            )
        return self


def bf16_thread_issues(scheduler: Any, field: str, stage: StageBase, ctx: SpecContext) -> list[SpecIssue]:
    """A bf16 CPU engine (a serve stage, or a promote stage's local production endpoint) on fewer
    than 2 threads: OpenVINO 2026.4 dies with SIGFPE compiling it, so refuse it here with the fix."""
    if scheduler.inference_precision != "bf16":
        return []
    own = stage.resources.cpus if stage.resources else None
    cpus = int(own or ctx.cpus_per_stage)  # as the plan counts them
    if cpus >= 2:
        return []
    return [
        SpecIssue(
            field,
            f"bf16 needs 2 or more engine threads; this stage gets {cpus} "
            "(OpenVINO 2026.4 crashes building a one-thread bf16 pipeline)",
            "give the stage `resources: {cpus: 2}` or use inference_precision: f32",
        )
    ]
