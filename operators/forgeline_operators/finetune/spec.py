"""The finetune stage's model: methods (sft, lora, qlora, dpo), backends (hf, megatron, nemo), their
settings, and the dataset formats each method reads. The operator's ``stage_model``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from forgeline.sdk import BASE_MODEL_REF, Ref, SpecContext, SpecIssue, StageBase, StrictModel
from forgeline_operators.lib.specs import QuantizeGate, TrainingSpec


class LoraSpec(StrictModel):
    r: int = Field(default=8, ge=1, description="LoRA rank.")
    alpha: float = Field(default=16, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Module names to adapt, or `all-linear`."
    )


class QLoraSpec(StrictModel):
    bits: Literal[4] = Field(default=4, description="Weight bits of the frozen base (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too.")


class DpoSpec(StrictModel):
    beta: float = Field(default=0.1, gt=0, description="DPO temperature beta.")
    loss: Literal["sigmoid", "ipo", "hinge"] = Field(default="sigmoid", description="DPO loss variant.")
    reference: Ref | None = Field(
        default=None, description="Frozen reference model (default: the stage's starting model)."
    )


class ParallelismSpec(StrictModel):
    tp: int = Field(default=1, ge=1, description="Tensor-parallel degree (megatron/nemo backends).")
    pp: int = Field(default=1, ge=1, description="Pipeline-parallel degree (megatron/nemo backends).")
    dp: int = Field(default=1, ge=1, description="Data-parallel replicas (Ray Train workers).")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


class NemoSpec(StrictModel):
    image: str | None = Field(
        default=None,
        description=(
            "Container image (default: the pinned NGC image: NeMo Framework for sft/lora, NeMo-RL for dpo)."
        ),
        min_length=1,
    )
    recipe: str | None = Field(
        default=None,
        description="Megatron-Bridge recipe for sft/lora (default: from the model name, e.g. llama3_70b).",
        pattern=r"^[a-z0-9_]+$",
    )
    overrides: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "Extra trainer keys (Megatron-Bridge ConfigContainer `section.field` for sft/lora, NeMo-RL "
            "config paths for dpo), checked against the trainer's keys before anything runs."
        ),
    )
    gpus_per_node: int = Field(default=8, ge=1, description="GPUs per node of the cluster the job runs on.")
    shared_dir: str | None = Field(
        default=None,
        description=(
            "Directory every node sees at the same path (job files, data, checkpoints; default: the "
            "stage's work directory, single-node only)."
        ),
    )
    pvc: str | None = Field(
        default=None,
        description="PersistentVolumeClaim mounted at shared_dir on the kubernetes target.",
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
    )
    namespace: str = Field(
        default="default",
        description="Kubernetes namespace of the RayJob / Job.",
        pattern=r"^[a-z0-9-]{1,63}$",
    )
    launcher: Literal["rayjob", "job"] = Field(
        default="rayjob",
        description="On the kubernetes target: a KubeRay RayJob or an indexed Kubernetes Job (torchrun).",
    )


class QatSpec(StrictModel):
    format: Literal["fp8", "int8_sq", "int8", "int4_awq", "w4a8_awq"] = Field(
        description="ModelOpt format simulated during training and exported (as the quantize stage does)."
    )
    calibration_samples: int = Field(
        default=64, ge=1, description="Training rows the quantizer scales are calibrated on before training."
    )
    gate: QuantizeGate = Field(
        default_factory=QuantizeGate,
        description="Gate of the trained quantized model vs the starting model, on the eval rows.",
    )
    export_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="dtype of the export's unquantized tensors (bf16: what TRT-LLM expects)."
    )

    @model_validator(mode="after")
    def _no_gate_dataset(self) -> QatSpec:
        if self.gate.dataset is not None:
            raise ValueError("qat.gate.dataset: the gate scores the eval rows; set eval_dataset instead")
        return self


class FinetuneStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("base",)
    dataset_fields: ClassVar[tuple[str, ...]] = ("dataset", "eval_dataset")
    outputs: ClassVar[tuple[str, ...]] = ("merged", "adapter", "checkpoint")
    primary_output: ClassVar[str | None] = "merged"

    kind: Literal["finetune"] = Field(description="Fine-tune a model.")
    method: Literal["sft", "lora", "qlora", "dpo"] = Field(
        description="`sft` (full), `lora`, `qlora` (4-bit base + LoRA), `dpo` (preference)."
    )
    backend: Literal["hf", "megatron", "nemo"] = Field(
        default="hf",
        description=(
            "`hf`: trl + peft on Ray Train; `megatron`: megatron-core TP/PP; `nemo`: NeMo containers."
        ),
    )
    base: Ref = Field(
        default=BASE_MODEL_REF, description="Model to start from (default: the workflow model)."
    )
    dataset: str = Field(description="Name of a dataset under `data:`.")
    eval_dataset: str | None = Field(default=None, description="Dataset for eval loss (default: a split).")
    lora: LoraSpec | None = Field(default=None, description="LoRA settings (lora, qlora; optional for dpo).")
    qlora: QLoraSpec | None = Field(default=None, description="Quantization of the frozen base (qlora).")
    dpo: DpoSpec | None = Field(default=None, description="DPO settings (method dpo).")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="TP / PP / DP layout.")
    merge: bool | None = Field(
        default=None, description="Also write the merged HF checkpoint (default: true for adapters)."
    )
    nemo: NemoSpec | None = Field(
        default=None, description="NeMo container job settings (backend nemo): image, recipe, overrides."
    )
    qat: QatSpec | None = Field(
        default=None,
        description="Quantization-aware training (ModelOpt): quantize, calibrate, then train (hf, sft).",
    )
    general_check: bool = Field(
        default=True,
        description=(
            "After training, the tuned model and its parent answer 20 fixed instruction prompts and are "
            "scored on held-out English text; answers go to an MLflow table side by side "
            "(`general/answers.json`), numbers to `general_*` metrics. Reports only: gate with "
            "evaluate stages. Runs on CPU in fp32: skipped for adapter-only outputs and above 4 GiB of "
            "weights."
        ),
    )

    @model_validator(mode="after")
    def _qat_settings(self) -> FinetuneStage:
        if self.qat is not None and (self.backend != "hf" or self.method != "sft"):
            raise ValueError(
                "`qat` runs with backend 'hf' and method 'sft' (full weights); "
                f"got backend {self.backend!r}, method {self.method!r}"
            )
        if self.qat is not None and self.parallelism.world_size > 1:
            raise ValueError("`qat` runs on one worker (parallelism dp = tp = pp = 1)")
        return self

    @model_validator(mode="after")
    def _method_settings(self) -> FinetuneStage:
        if self.method == "sft" and self.lora is not None:
            raise ValueError("`lora` settings were given for method 'sft' (full fine-tune); use method: lora")
        if self.method != "qlora" and self.qlora is not None:
            raise ValueError(f"`qlora` settings were given for method {self.method!r}; use method: qlora")
        if self.method != "dpo" and self.dpo is not None:
            raise ValueError(f"`dpo` settings were given for method {self.method!r}; use method: dpo")
        if self.nemo is not None and self.backend != "nemo":
            raise ValueError(f"`nemo` settings were given for backend {self.backend!r}; use backend: nemo")
        if self.backend == "nemo" and self.method == "qlora":
            raise ValueError(
                "backend nemo has no qlora (NeMo trainers do LoRA on bf16 weights); use method: lora"
            )
        return self

    def refs(self) -> dict[str, str]:
        out = {"base": self.base}
        if self.dpo is not None and self.dpo.reference is not None:
            out["dpo.reference"] = self.dpo.reference
        return out

    def backend_name(self) -> str | None:
        return self.backend

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "qlora") or (self.method == "dpo" and self.lora is not None)

    produces_model: ClassVar[bool] = True

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        allowed = DATASET_FORMATS_FOR_METHOD[self.method]
        return self._dataset_formats(
            ctx, allowed, f"method {self.method!r} needs", ("dataset", "eval_dataset")
        )


DATASET_FORMATS_FOR_METHOD = {
    "sft": ("sft", "text"),
    "lora": ("sft", "text"),
    "qlora": ("sft", "text"),
    "dpo": ("preference",),
}
