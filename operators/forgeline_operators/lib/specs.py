"""Spec models more than one stage kind uses: optimisation settings (finetune, distill), calibration
data (quantize, prune) and the quantization quality gate (quantize, finetune's ``qat:``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgeline.sdk import StrictModel


class TrainingSpec(StrictModel):
    epochs: float = Field(default=1, gt=0, description="Passes over the training set.")
    max_steps: int | None = Field(default=None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(default=8, ge=1, description="Sequences per worker per forward pass.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(default=1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Fraction of steps for warmup.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_seq_len: int = Field(default=512, ge=8, description="Truncate longer rows (counted, reported).")
    seed: int = Field(default=0, description="Random seed (data order, init of adapters).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Training precision (fp32 on CPU; bf16 on GPU)."
    )
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    checkpoint_every_steps: int | None = Field(
        default=None, gt=0, description="Write a resumable checkpoint every N steps."
    )
    eval_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Fraction of the dataset held out for eval loss."
    )


class CalibrationSpec(StrictModel):
    dataset: str = Field(description="Name of a dataset under `data:` used for calibration.")
    samples: int = Field(default=128, ge=1, description="Calibration rows.")
    max_seq_len: int = Field(default=256, ge=8, description="Tokens per calibration row.")


class QuantizeGate(StrictModel):
    max_perplexity_increase: float | None = Field(
        default=None, ge=0, description="Fail when perplexity rises more than this fraction vs the parent."
    )
    min_token_agreement: float | None = Field(
        default=None, ge=0, le=1, description="Fail when greedy tokens agree with the parent less than this."
    )
    dataset: str | None = Field(default=None, description="Held-out dataset for the gate (default: calib).")
