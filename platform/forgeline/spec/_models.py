"""The workflow spec: typed pydantic models that are the single source of truth for workflow YAML.

Every model forbids unknown keys and describes every field (the descriptions feed the JSON Schema in
``workflows/schema.json`` and the reference docs). Stages are a discriminated union on ``kind``; each
stage kind declares the names of its outputs and its primary output, so references such as
``${stages.sft.outputs.merged}`` are checked before anything runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import CoreSchema

REF_PATTERN = re.compile(r"^\$\{\s*(?:(model)|stages\.([A-Za-z0-9_-]+)\.outputs\.([A-Za-z0-9_]+))\s*\}$")
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
# Names that become file names, locks or process identities (endpoint records, live repositories,
# promotion locks) or registry keys: one plain path component each, checked here so the CLI, the REST
# API and the runtime refuse the same names with a located error (never `../other-home/...`).
REGISTERED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
EXPERIMENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
# What each name pattern means, for error messages.
PATTERN_HELP = {
    NAME_PATTERN: "lowercase letters, digits, '-' and '_', starting with a letter, at most 63 characters",
    REGISTERED_NAME_PATTERN: (
        "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 200 characters"
    ),
    ALIAS_PATTERN: "letters, digits, '_' and '-', starting with a letter, at most 64 characters",
}
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
BASE_MODEL_REF = "${model}"

Ref = Annotated[
    str,
    Field(
        description=(
            "A reference to an earlier stage's output (`${stages.NAME.outputs.KEY}`), the workflow's "
            "base model (`${model}`), or a model URI (local path, `hf://`, `s3://`, "
            "`mlflow://models/NAME@ALIAS` or MLflow's `models:/NAME@ALIAS` / `models:/NAME/VERSION`, "
            "`builtin://NAME`)."
        ),
        min_length=1,
    ),
]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


# ---------------------------------------------------------------------------------------------- top


class ModelSpec(StrictModel):
    base: str = Field(
        description=(
            "Base model URI: a local directory, `hf://ORG/NAME[@REVISION]`, `s3://BUCKET/PREFIX`, "
            "`mlflow://models/NAME@ALIAS` (or `/VERSION`; MLflow's `models:/NAME@ALIAS` and "
            "`models:/NAME/VERSION` are the same), a `.gguf` file, or `builtin://smollm2-135m-instruct` / "
            "`builtin://tiny-llama`."
        ),
        min_length=1,
    )
    parameters: int | None = Field(
        default=None,
        gt=0,
        description="Parameter count, for plan estimates when it cannot be read from a local config.json.",
    )


class DatasetSpec(StrictModel):
    path: str = Field(description="Path of a JSON-lines file, relative to the workflow file.", min_length=1)
    format: Literal["sft", "preference", "text"] = Field(
        description=(
            "`sft`: {prompt, completion} or chat {messages}; `preference`: {prompt, chosen, rejected}; "
            "`text`: {text}."
        )
    )
    rendering: Literal["auto", "chat_template", "raw"] = Field(
        default="auto",
        description=(
            "How sft and preference rows become text, the same in every stage that reads them: "
            "`chat_template` renders {prompt, completion} as a user/assistant conversation with the "
            "model's chat template (end-of-turn token graded), as the chat endpoint renders requests; "
            "`raw` joins prompt + completion + EOS verbatim (base models, raw `/v1/completions` "
            "prompts); `auto` picks `chat_template` when the model's tokenizer has one."
        ),
    )


class TrackingSpec(StrictModel):
    uri: str | None = Field(
        default=None,
        description=(
            "MLflow tracking URI. Default: `sqlite:///<project>/.forgeline/mlflow.db`; "
            "the MLFLOW_TRACKING_URI environment variable overrides."
        ),
    )
    experiment: str | None = Field(
        default=None,
        description="MLflow experiment name (default: the workflow name).",
        pattern=EXPERIMENT_PATTERN,
    )


class ResourcesSpec(StrictModel):
    device: Literal["cpu", "gpu"] = Field(
        default="cpu", description="Where stages run: `cpu` (embedded default) or `gpu` nodes."
    )
    cpus_per_stage: float = Field(default=1, gt=0, description="Ray CPUs reserved for each stage.")
    gpu_memory_gb: float = Field(
        default=80, gt=0, description="Memory of one GPU, for the plan's fits-on-GPU check."
    )
    gpu_tflops: float = Field(
        default=989, gt=0, description="Dense bf16 peak TFLOP/s of one GPU, for GPU-hour estimates."
    )
    mfu: float = Field(
        default=0.4, gt=0, le=1, description="Assumed model FLOP utilisation for GPU-hour estimates."
    )
    memory_gb: float | None = Field(
        default=None, gt=0, description="Host memory available to one stage, for the plan's fit check."
    )


class StageResources(StrictModel):
    cpus: float | None = Field(default=None, gt=0, description="Ray CPUs for this stage.")
    gpus: int | None = Field(
        default=None, ge=0, description="GPUs for this stage (default: tp*pp*dp for finetune on gpu)."
    )
    memory_gb: float | None = Field(default=None, gt=0, description="Ray memory reservation (GiB).")


@dataclass(frozen=True)
class SpecContext:
    """What a stage's own semantic checks see of the rest of its workflow (built by the loader)."""

    stages: tuple[str, ...]  # every stage name, in YAML order
    kinds: Mapping[str, str]  # stage name -> kind
    formats: Mapping[str, str | None]  # dataset name -> format (None: not given)
    cpus_per_stage: float = 1  # the workflow's resources.cpus_per_stage

    def unknown_stage(self, field: str, name: str, extra: tuple[str, ...] = ()) -> SpecIssue:
        from forgeline.spec._errors import did_you_mean

        return SpecIssue(field, f"unknown stage {name!r}", did_you_mean(name, [*self.stages, *extra]))


@dataclass(frozen=True)
class SpecIssue:
    """A problem a stage finds with itself: ``field`` relative to the stage ("" for the stage)."""

    field: str
    message: str
    hint: str | None = None


class StageBase(StrictModel):
    outputs: ClassVar[tuple[str, ...]] = ()
    primary_output: ClassVar[str | None] = None
    value_outputs: ClassVar[frozenset[str]] = frozenset()  # outputs that are plain values, not dirs
    # Top-level fields holding a Ref / a dataset name (checked even when other fields fail validation).
    ref_fields: ClassVar[tuple[str, ...]] = ()
    dataset_fields: ClassVar[tuple[str, ...]] = ()

    name: str = Field(description="Unique stage name (lowercase, digits, `-`, `_`).", pattern=NAME_PATTERN)
    needs: list[str] | None = Field(
        default=None,
        description=(
            "Stages that must finish first. Default: the previous stage. References in typed fields "
            "add their stages automatically. `[]` makes a root stage."
        ),
    )
    resources: StageResources | None = Field(default=None, description="Overrides of workflow resources.")
    cache: bool = Field(default=True, description="Reuse a finished result with the same cache key.")
    timeout_minutes: float | None = Field(
        default=None, gt=0, description="Fail the stage when it runs longer than this."
    )

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        # `${stages.model.outputs.X}` would parse as the base model `${model}` everywhere refs are read.
        if v == "model":
            raise ValueError("'model' is reserved for the base model (`${model}`); choose another name")
        return v

    def refs(self) -> dict[str, str]:
        """Reference-typed fields of this stage: field path -> Ref string."""
        return {}

    def backend_name(self) -> str | None:
        return None

    def dataset_refs(self) -> dict[str, str]:
        """Dataset-name fields of this stage: field path -> dataset name."""
        out = {}
        for f in self.dataset_fields:
            v = getattr(self, f, None)
            if isinstance(v, str):
                out[f] = v
        return out

    # The kind's own semantic checks, after validation; the loader runs the generic ones (names,
    # needs, references, unknown datasets) and places each issue at its field in the YAML.
    produces_model: ClassVar[bool] = False  # its primary output is a model (a baseline for evaluate)

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        return []

    def extra_needs(self) -> list[str]:
        """Stages this one runs after beyond ``needs`` and its references (promote: ``requires``)."""
        return []

    def resolved(self, ctx: SpecContext) -> tuple[list[SpecIssue], StageBase]:
        """This stage with the fields computed from the rest of the workflow (default: none)."""
        return [], self

    def _dataset_formats(
        self, ctx: SpecContext, allowed: tuple[str, ...], why: str, fields: tuple[str, ...] | None = None
    ) -> list[SpecIssue]:
        """An issue for each known dataset of this stage whose format is not in ``allowed``."""
        issues = []
        for fpath, name in self.dataset_refs().items():
            if (fields is None or fpath in fields) and name in ctx.formats:
                fmt = ctx.formats[name]
                if fmt not in allowed:
                    options = " or ".join(map(repr, allowed))
                    issues.append(
                        SpecIssue(fpath, f"{why} a dataset of format {options}; {name!r} is {fmt!r}")
                    )
        return issues


# --------------------------------------------------------------------------------------- finetune


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

    # --------------------------------------------------------------------------------------- evaluate

    produces_model: ClassVar[bool] = True

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        allowed = DATASET_FORMATS_FOR_METHOD[self.method]
        return self._dataset_formats(
            ctx, allowed, f"method {self.method!r} needs", ("dataset", "eval_dataset")
        )


class EvaluateGates(StrictModel):
    max_perplexity: float | None = Field(default=None, gt=0, description="Fail above this perplexity.")
    min_token_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="Fail below this next-token accuracy on completion tokens."
    )
    min_exact_match: float | None = Field(
        default=None, ge=0, le=1, description="Fail below this greedy exact-match rate (sft data)."
    )
    min_contains: float | None = Field(
        default=None, ge=0, le=1, description="Fail below this rate of answers containing the reference."
    )
    max_regression_vs: str | None = Field(
        default=None,
        description="`base` or an earlier stage name: evaluate that model too and fail if this one is worse.",
    )
    max_regression: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Allowed relative regression vs `max_regression_vs` (0.02 = 2 %), checked at the worst end "
            "of the paired bootstrap interval, so noise on a few rows cannot pass a worse model."
        ),
    )
    min_improvement: dict[Literal["token_accuracy", "exact_match", "contains"], float] | None = Field(
        default=None,
        description=(
            "Absolute improvement over `max_regression_vs` the paired interval must lie above, by "
            "metric: `{exact_match: 0.0}` fails unless the whole interval of (this - baseline) is > 0."
        ),
    )
    confidence: float = Field(
        default=0.95, gt=0.5, lt=1, description="Level of the paired bootstrap intervals gates use."
    )
    bootstrap_samples: int = Field(
        default=1000, ge=100, le=100_000, description="Resamples of the rows for the paired intervals."
    )
    # Computed by the loader from max_regression_vs (the comparison model's Ref); never set by users.
    baseline_ref: SkipJsonSchema[str | None] = Field(default=None, exclude=True)

    @field_validator("baseline_ref")
    @classmethod
    def _not_user_settable(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("baseline_ref is computed from max_regression_vs; remove it")
        return v

    @model_validator(mode="after")
    def _improvement_needs_baseline(self) -> EvaluateGates:
        if self.min_improvement and self.max_regression_vs is None:
            raise ValueError(
                "min_improvement compares with a baseline: set max_regression_vs (e.g. base) as well"
            )
        return self


EvalMetric = Literal["perplexity", "token_accuracy", "exact_match", "contains"]


class LmEvalSpec(StrictModel):
    """lm-evaluation-harness tasks run by the evaluate stage (forgeline_operators.evaluate.harness)."""

    tasks: list[str] = Field(
        min_length=1,
        description=(
            "lm-eval task, group or tag names, e.g. `forgeline_held_out` (shipped); names not found "
            "in `include_path` are looked up among lm-eval's own tasks (those fetch data from the hub)."
        ),
    )
    include_path: str | None = Field(
        default=None,
        description=(
            "Directory of lm-eval task YAMLs, relative to the workflow file (default: the tasks "
            "shipped in `workflows/lm_eval`). Relative `dataset_kwargs.data_files` in them are relative "
            "to each YAML file. When set, its files enter the cache key (data files outside it do not)."
        ),
    )
    endpoint: str | None = Field(
        default=None,
        description=(
            "Evaluate what an OpenAI-compatible endpoint serves instead of loading `model` (whose "
            "tokenizer still decides `chat: auto`): a base URL (`http://HOST:PORT`, `/v1` optional) or "
            "`${stages.NAME.outputs.endpoint}`. Chat: lm-eval's `local-chat-completions`, else "
            "`local-completions`."
        ),
    )
    limit: int | None = Field(default=None, gt=0, description="Evaluate the first N documents of each task.")
    num_fewshot: int = Field(default=0, ge=0, description="Few-shot examples per prompt.")
    chat: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "Render prompts with the model's chat template: `auto` when its tokenizer has one (as "
            "datasets are rendered), `on` (fail without one), `off` (plain prompts)."
        ),
    )

    @field_validator("tasks")
    @classmethod
    def _distinct_names(cls, v: list[str]) -> list[str]:
        if any(not name.strip() for name in v):
            raise ValueError("task names must not be empty")
        if len(set(v)) != len(v):
            raise ValueError(f"task names repeat: {sorted({n for n in v if v.count(n) > 1})}")
        return v

    @field_validator("include_path")
    @classmethod
    def _local_directory(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError(f"{v!r}: include_path is a local directory (relative to the workflow file)")
        return v

    @field_validator("endpoint")
    @classmethod
    def _url_or_ref(cls, v: str | None) -> str | None:
        if v is not None and not is_ref_like(v) and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r}: expected an http(s):// base URL or ${{stages.NAME.outputs.endpoint}}")
        return v


class EvaluateStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("model",)
    dataset_fields: ClassVar[tuple[str, ...]] = ("dataset",)
    outputs: ClassVar[tuple[str, ...]] = ("report",)
    primary_output: ClassVar[str | None] = "report"

    kind: Literal["evaluate"] = Field(description="Measure a model on a dataset; optionally gate on it.")
    model: Ref = Field(default=BASE_MODEL_REF, description="Model to evaluate.")
    dataset: str = Field(description="Name of a dataset under `data:`.")
    metrics: list[EvalMetric] = Field(
        default_factory=lambda: list[EvalMetric](["perplexity", "token_accuracy"]),
        description=(
            "Metrics to compute. `exact_match` and `contains` generate greedily (sft data only): "
            "`exact_match` needs the answer to equal the reference, `contains` needs the reference to "
            "appear in it as whole words, case-insensitive (a key fact in a free-form chat answer)."
        ),
    )
    max_samples: int | None = Field(default=256, gt=0, description="Evaluate the first N rows.")
    batch_size: int = Field(default=8, ge=1, description="Rows per forward pass.")
    max_seq_len: int = Field(default=256, ge=8, description="Truncate longer rows (counted, reported).")
    max_new_tokens: int = Field(default=32, ge=1, description="Generation length for exact_match.")
    gates: EvaluateGates = Field(default_factory=EvaluateGates, description="Pass/fail thresholds.")
    lm_eval: LmEvalSpec | None = Field(
        default=None,
        description="Also run lm-evaluation-harness tasks; every metric and its stderr is logged.",
    )

    def refs(self) -> dict[str, str]:
        out = {"model": self.model}
        if self.gates.baseline_ref:
            out["gates.max_regression_vs"] = self.gates.baseline_ref
        if self.lm_eval is not None:
            # The task directory is an input like a model: its content keys the cache, and the
            # REST API refuses relative paths in it; an endpoint ref makes the deploy stage a dependency.
            if self.lm_eval.include_path is not None:
                out["lm_eval.include_path"] = self.lm_eval.include_path
            if self.lm_eval.endpoint is not None and is_ref_like(self.lm_eval.endpoint):
                out["lm_eval.endpoint"] = self.lm_eval.endpoint
        return out

    # --------------------------------------------------------------------------------------- quantize

    def generated_metrics(self) -> list[str]:
        """The metrics (requested or gated) that grade a generated answer and so need a reference."""
        gates = self.gates
        wanted = set(self.metrics) | set(gates.min_improvement or {})
        if gates.min_exact_match is not None:
            wanted.add("exact_match")
        if gates.min_contains is not None:
            wanted.add("contains")
        return sorted(wanted & {"exact_match", "contains"})

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        generated = self.generated_metrics()
        issues = []
        for fpath, name in self.dataset_refs().items():
            fmt = ctx.formats.get(name)
            if generated and name in ctx.formats and fmt != "sft":
                verb = (
                    "compares generated completions, so it needs"
                    if len(generated) == 1
                    else ("compare generated completions, so they need")
                )
                issues.append(
                    SpecIssue(
                        fpath,
                        f"{' and '.join(generated)} {verb} an 'sft' dataset; {name!r} is {fmt!r}",
                        f"drop {' / '.join(generated)} (and the gates on it) or evaluate on an sft dataset",
                    )
                )
        return issues

    def resolved(self, ctx: SpecContext) -> tuple[list[SpecIssue], StageBase]:
        """``gates.baseline_ref``: the model ``max_regression_vs`` names (the base or a model stage)."""
        target = self.gates.max_regression_vs
        if target is None:
            return [], self
        field = "gates.max_regression_vs"
        if target == "base":
            ref = BASE_MODEL_REF
        elif target not in ctx.stages:
            return [ctx.unknown_stage(field, target, ("base",))], self
        else:
            kind = ctx.kinds.get(target)
            kinds = stage_classes()
            cls = kinds.get(kind or "")
            if cls is None or not cls.produces_model:
                models = "/".join(k for k, c in kinds.items() if c.produces_model)
                message = (
                    f"stage {target!r} (kind {kind!r}) produces no model; compare against 'base' or a "
                    f"{models} stage"
                )
                return [SpecIssue(field, message)], self
            ref = output_ref(target, cls.primary_output or "")
        gates = self.gates.model_copy(update={"baseline_ref": ref})
        return [], self.model_copy(update={"gates": gates})


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


class TrtllmExportSpec(StrictModel):
    tp: int = Field(default=1, ge=1, description="Tensor-parallel shards of the TRT-LLM checkpoint.")
    pp: int = Field(default=1, ge=1, description="Pipeline-parallel shards of the TRT-LLM checkpoint.")


class QuantizeStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("model",)
    outputs: ClassVar[tuple[str, ...]] = ("checkpoint", "trtllm_checkpoint")
    primary_output: ClassVar[str | None] = "checkpoint"

    kind: Literal["quantize"] = Field(description="Post-training quantization.")
    model: Ref = Field(default=BASE_MODEL_REF, description="Model to quantize.")
    format: Literal["fp8", "int8_sq", "int8", "int4_awq", "w4a8_awq", "nvfp4", "nncf_int8", "nncf_int4"] = (
        Field(description="ModelOpt format (fp8 ... nvfp4) or NNCF weight compression for the CPU runtime.")
    )
    kv_cache_dtype: Literal["fp8", "none"] = Field(default="none", description="Quantize the KV cache.")
    calibration: CalibrationSpec | None = Field(default=None, description="Calibration data.")
    gate: QuantizeGate = Field(default_factory=QuantizeGate, description="Quality gate vs the parent.")
    export_trtllm: TrtllmExportSpec | None = Field(
        default=None, description="Also export a TP/PP-sharded TRT-LLM checkpoint (legacy engine path)."
    )
    export_dtype: Literal["bf16", "fp16", "fp32"] | None = Field(
        default=None,
        description="dtype of a ModelOpt export's unquantized tensors (default bf16, what TRT-LLM expects).",
    )

    def refs(self) -> dict[str, str]:
        return {"model": self.model}

    def dataset_refs(self) -> dict[str, str]:
        out = {}
        if self.calibration:
            out["calibration.dataset"] = self.calibration.dataset
        if self.gate.dataset:
            out["gate.dataset"] = self.gate.dataset
        return out

    # ----------------------------------------------------------------------------- distill and prune

    produces_model: ClassVar[bool] = True


class StudentShapeSpec(StrictModel):
    num_hidden_layers: int = Field(
        ge=1, description="Decoder layers of the student, copied from the teacher."
    )
    layers: list[int] | None = Field(
        default=None,
        description="Teacher layer indices to copy, in order (default: evenly spaced, first and last kept).",
    )

    @model_validator(mode="after")
    def _layers_match(self) -> StudentShapeSpec:
        if self.layers is not None and len(self.layers) != self.num_hidden_layers:
            raise ValueError(
                f"`layers` lists {len(self.layers)} indices but num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError("`layers` repeats a teacher layer index")
        return self


class DistillSpec(StrictModel):
    temperature: float = Field(default=2.0, gt=0, description="Softmax temperature T of both models' logits.")
    kl_weight: float = Field(
        default=1.0, ge=0, description="Weight of KL(teacher || student) on T-scaled logits, times T²."
    )
    hard_label_weight: float = Field(
        default=0.0, ge=0, description="Weight of the cross-entropy on the dataset's tokens (0: soft only)."
    )

    @model_validator(mode="after")
    def _some_loss(self) -> DistillSpec:
        if self.kl_weight == 0 and self.hard_label_weight == 0:
            raise ValueError("kl_weight and hard_label_weight are both 0: nothing to train on")
        return self


class DistillStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("teacher", "student")
    dataset_fields: ClassVar[tuple[str, ...]] = ("dataset", "eval_dataset")
    outputs: ClassVar[tuple[str, ...]] = ("checkpoint",)
    primary_output: ClassVar[str | None] = "checkpoint"

    kind: Literal["distill"] = Field(description="Train a smaller student on the teacher's soft targets.")
    teacher: Ref = Field(
        default=BASE_MODEL_REF, description="The teacher model (default: the workflow model)."
    )
    student: Ref | StudentShapeSpec = Field(
        description=(
            "The student: a model reference (e.g. a prune stage's checkpoint), or a shape derived from "
            "the teacher, e.g. `{num_hidden_layers: 1}` (layers copied from the teacher)."
        )
    )
    dataset: str = Field(description="Name of a dataset under `data:` (format sft or text).")
    eval_dataset: str | None = Field(
        default=None, description="Held-out dataset for loss, perplexity and KL (default: a split)."
    )
    distill: DistillSpec = Field(default_factory=DistillSpec, description="Loss settings.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")

    @model_validator(mode="after")
    def _supported_training(self) -> DistillStage:
        if self.training.checkpoint_every_steps is not None:
            raise ValueError("distill does not checkpoint mid-run; drop training.checkpoint_every_steps")
        return self

    def refs(self) -> dict[str, str]:
        out = {"teacher": self.teacher}
        if isinstance(self.student, str):
            out["student"] = self.student
        return out

    produces_model: ClassVar[bool] = True

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        # Distillation and pruning score token sequences: preference pairs have no single one.
        return self._dataset_formats(ctx, ("sft", "text"), f"{self.kind} needs")


class PruneSpec(StrictModel):
    intermediate_size: int | None = Field(
        default=None, ge=1, description="MLP intermediate size to keep (the most important channels)."
    )
    num_attention_heads: int | None = Field(
        default=None,
        ge=1,
        description="Query heads to keep; a multiple of num_key_value_heads (the same count per GQA group).",
    )
    num_hidden_layers: int | None = Field(
        default=None, ge=1, description="Decoder layers to keep (the least important are dropped)."
    )

    @model_validator(mode="after")
    def _something(self) -> PruneSpec:
        if (
            self.intermediate_size is None
            and self.num_attention_heads is None
            and self.num_hidden_layers is None
        ):
            raise ValueError("set at least one of intermediate_size, num_attention_heads, num_hidden_layers")
        return self


class PruneStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("model",)
    outputs: ClassVar[tuple[str, ...]] = ("checkpoint",)
    primary_output: ClassVar[str | None] = "checkpoint"

    kind: Literal["prune"] = Field(
        description="Structured pruning (width and depth) by activation importance."
    )
    model: Ref = Field(default=BASE_MODEL_REF, description="Model to prune.")
    target: PruneSpec = Field(description="The pruned shape: any of MLP width, attention heads, depth.")
    calibration: CalibrationSpec = Field(description="Data the importance scores are computed on.")
    eval_dataset: str | None = Field(
        default=None,
        description="Held-out dataset for perplexity before/after (default: the calibration rows not used).",
    )

    def refs(self) -> dict[str, str]:
        return {"model": self.model}

    def dataset_refs(self) -> dict[str, str]:
        out = {"calibration.dataset": self.calibration.dataset}
        if self.eval_dataset:
            out["eval_dataset"] = self.eval_dataset
        return out

    # ------------------------------------------------------------------------------------------ build

    produces_model: ClassVar[bool] = True

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        # Distillation and pruning score token sequences: preference pairs have no single one.
        return self._dataset_formats(ctx, ("sft", "text"), f"{self.kind} needs")


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


class OpenvinoBuildSpec(StrictModel):
    weight_format: Literal["fp32", "fp16", "int8", "int4"] | None = Field(
        default=None, description="Weight format of the IR (default: from the quantize stage, else fp32)."
    )


class BuildStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("from",)
    outputs: ClassVar[tuple[str, ...]] = ("artifact",)
    primary_output: ClassVar[str | None] = "artifact"

    kind: Literal["build"] = Field(description="Build the serving artifact for an engine.")
    engine: Literal["tensorrt-llm", "openvino"] = Field(description="Serving engine to build for.")
    from_: Ref = Field(alias="from", description="Checkpoint to build from.")
    tensorrt_llm: TrtllmBuildSpec | None = Field(default=None, description="TensorRT-LLM build settings.")
    openvino: OpenvinoBuildSpec | None = Field(default=None, description="OpenVINO export settings.")

    def refs(self) -> dict[str, str]:
        return {"from": self.from_}

    def backend_name(self) -> str | None:
        return self.engine


# --------------------------------------------------------------------------------------- register


class RegisterStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("model",)
    outputs: ClassVar[tuple[str, ...]] = ("version", "model_uri")
    primary_output: ClassVar[str | None] = "version"
    value_outputs: ClassVar[frozenset[str]] = frozenset({"version", "model_uri"})

    kind: Literal["register"] = Field(description="Register a model version in the MLflow registry.")
    model: Ref = Field(description="Directory to register (by reference: URI + sha256, never uploaded).")
    registered_name: str = Field(description="Registered model name.", pattern=REGISTERED_NAME_PATTERN)
    alias: str | None = Field(
        default="candidate", description="Alias to point at the new version.", pattern=ALIAS_PATTERN
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the model version.")

    def refs(self) -> dict[str, str]:
        return {"model": self.model}


# ------------------------------------------------------------------------------------------ serve


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


class SpeculativeSpec(StrictModel):
    draft: Ref = Field(
        description="Draft model sharing the served model's tokenizer (an OpenVINO IR or HF checkpoint)."
    )
    num_assistant_tokens: int = Field(
        default=5, ge=1, le=32, description="Tokens the draft proposes per step; the target checks them."
    )


ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ServeStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("model",)
    outputs: ClassVar[tuple[str, ...]] = ("repository",)
    primary_output: ClassVar[str | None] = "repository"

    kind: Literal["serve"] = Field(description="Build a Triton model repository for the model.")
    runtime: Literal["triton"] = Field(default="triton", description="Inference server.")
    model: Ref = Field(description="Built artifact or registered version to serve.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Batching limits.")
    adapters: dict[Annotated[str, Field(pattern=ADAPTER_NAME_PATTERN)], Ref] = Field(
        default_factory=dict,
        description=(
            "LoRA adapters served by name (the `model` id in OpenAI requests), e.g. "
            "`{sql: ${stages.sft.outputs.adapter}}`; scale lora_alpha / r from each adapter_config.json."
        ),
    )
    speculative: SpeculativeSpec | None = Field(
        default=None, description="Speculative decoding with a draft model (CPU runtime)."
    )

    def refs(self) -> dict[str, str]:
        out = {"model": self.model}
        out.update({f"adapters.{name}": ref for name, ref in sorted(self.adapters.items())})
        if self.speculative is not None:
            out["speculative.draft"] = self.speculative.draft
        return out

    # ----------------------------------------------------------------------------------------- deploy

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        return bf16_thread_issues(self.scheduler, "scheduler.inference_precision", self, ctx)


class RolloutGates(StrictModel):
    p95_ttft_ms: float | None = Field(default=None, gt=0, description="Max p95 time to first token.")
    error_rate: float | None = Field(default=None, ge=0, le=1, description="Max error rate.")


class RolloutSpec(StrictModel):
    strategy: Literal["rolling", "canary"] = Field(default="rolling", description="Rollout strategy.")
    steps: list[int] = Field(default_factory=lambda: [100], description="Canary traffic percentages.")
    gates: RolloutGates = Field(default_factory=RolloutGates, description="Checked between steps.")
    step_interval_s: int = Field(
        default=60, ge=1, le=86400, description="Observation window per canary step (s)."
    )
    max_surge_gpus: int | None = Field(
        default=None, ge=1, description="GPUs the canary may add (default: one replica's)."
    )

    @field_validator("steps")
    @classmethod
    def _steps_increase_to_100(cls, v: list[int]) -> list[int]:
        if not v or any(not 0 < p <= 100 for p in v):
            raise ValueError(f"steps {v}: each must be a percentage in 1..100, e.g. [10, 50, 100]")
        if v[-1] != 100 or any(b <= a for a, b in zip(v, v[1:], strict=False)):  # noqa: RUF007
            raise ValueError(f"steps {v}: must increase strictly and end at 100, e.g. [10, 50, 100]")
        return v


class RepositorySourceSpec(StrictModel):
    pvc: str | None = Field(default=None, description="PVC holding the model repository.")
    path: str = Field(default="", description="Directory of the repository inside the PVC.")
    uri: str | None = Field(
        default=None, description="Object-store URI (s3://, gs://) an init container copies from."
    )

    @model_validator(mode="after")
    def _one_source(self) -> RepositorySourceSpec:
        if (self.pvc is None) == (self.uri is None):
            raise ValueError("repository: set exactly one of `pvc` (with `path`) or `uri`")
        return self


class KubernetesDeploySpec(StrictModel):
    namespace: str = Field(
        default="default", description="Namespace of the endpoint.", pattern=DNS_LABEL_PATTERN
    )
    image: str | None = Field(default=None, description="Server image (default: the runtime's pinned image).")
    replicas: int = Field(default=1, ge=0, description="Replicas of the serving revision.")
    max_replicas: int | None = Field(
        default=None, ge=1, description="HPA ceiling (Triton queue time; default: replicas)."
    )
    gpus: int = Field(default=1, ge=0, description="`nvidia.com/gpu` per replica.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod node selector.")
    tolerations: list[dict[str, str | int]] = Field(
        default_factory=list, description="Pod tolerations (Kubernetes shape: key, operator, value, effect)."
    )
    cpu: str = Field(default="4", description="CPU request per replica (Kubernetes quantity).")
    memory: str = Field(default="32Gi", description="Memory request per replica (Kubernetes quantity).")
    repository: RepositorySourceSpec | None = Field(
        default=None, description="Where pods read the model from (default: `uri` = the resolved model URI)."
    )
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="Type of the endpoint's stable Service."
    )
    metrics_url: str | None = Field(
        default=None, description="Prometheus base URL for rollout gates (default: scrape the canary pods)."
    )
    gateway: str | None = Field(
        default=None, description="Gateway (`NAME` or `NAMESPACE/NAME`) the weighted HTTPRoute attaches to."
    )


class DeployStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("repository",)
    outputs: ClassVar[tuple[str, ...]] = ("endpoint",)
    primary_output: ClassVar[str | None] = "endpoint"
    value_outputs: ClassVar[frozenset[str]] = frozenset({"endpoint"})

    kind: Literal["deploy"] = Field(description="Roll out an endpoint serving a model repository.")
    runtime: Literal["triton", "nim"] = Field(default="triton", description="Serving runtime.")
    repository: Ref = Field(description="Model repository (serve stage output) or model to serve (nim).")
    endpoint_name: str | None = Field(
        default=None, description="Endpoint name (default: workflow name).", pattern=NAME_PATTERN
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="Local port (local target).")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="How traffic moves over.")
    kubernetes: KubernetesDeploySpec | None = Field(
        default=None, description="Cluster settings of the endpoint (workflow `target: kubernetes`)."
    )

    def refs(self) -> dict[str, str]:
        return {"repository": self.repository}

    def backend_name(self) -> str | None:
        return self.runtime


# ---------------------------------------------------------------------------------------- promote


class MetricGate(StrictModel):
    metric: str = Field(description="Metric recorded on the version, e.g. `token_accuracy`, `perplexity`.")
    stage: str | None = Field(
        default=None,
        description="Evaluate stage whose metric it is (default: the only upstream stage that logged it).",
    )
    vs: Literal["production", "parent"] = Field(
        default="production",
        description=(
            "Compare with the current production version's value, or with the parent model's value "
            "measured by the same evaluate stage (`baseline_<metric>`)."
        ),
    )
    max_regression: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Largest relative change for the worse allowed (0.02 = 2 %), checked at the worst end of the "
            "paired bootstrap interval when both sides were scored on the same rows (per-row scores of "
            "the evaluate stage on both versions, or the stage's own comparison with the parent); "
            "otherwise on the point values, and the gate's message says so."
        ),
    )
    confidence: float = Field(
        default=0.95, gt=0.5, lt=1, description="Level of the paired interval vs production."
    )


class QuantizationGate(StrictModel):
    max_perplexity_increase: float | None = Field(
        default=None,
        ge=0,
        description="Largest relative perplexity increase of the quantize stage vs parent.",
    )
    min_token_agreement: float | None = Field(
        default=None, ge=0, le=1, description="Smallest greedy-token agreement with the parent."
    )


class SloGate(StrictModel):
    p95_ttft_ms: float | None = Field(default=None, gt=0, description="Max p95 time to first token (ms).")
    min_tokens_per_s: float | None = Field(
        default=None, gt=0, description="Min output tokens per second at `concurrency`."
    )
    max_error_rate: float = Field(default=0.0, ge=0, le=1, description="Max share of failed requests.")
    concurrency: int = Field(default=4, ge=1, le=256, description="Concurrent requests of the benchmark.")
    requests: int = Field(default=16, ge=1, le=10_000, description="Requests of the benchmark.")
    max_tokens: int = Field(default=16, ge=1, le=4096, description="Output tokens per request (max).")


class PromotionGates(StrictModel):
    metrics: list[MetricGate] = Field(
        default_factory=list, description="Evaluation metrics vs production or the parent."
    )
    quantization: QuantizationGate | None = Field(
        default=None, description="Quality delta of the quantize stage (read from the version's tags)."
    )
    slo: SloGate | None = Field(
        default=None, description="A short benchmark against a candidate endpoint serving the version."
    )
    approval: bool = Field(
        default=False, description="Require `forgeline approve MODEL --version N` before promotion."
    )


class PromoteEndpointSpec(StrictModel):
    name: str = Field(description="Name of the production endpoint.", pattern=NAME_PATTERN)
    target: Literal["local", "kubernetes"] | None = Field(
        default=None,
        description=(
            "`local`: a tritonserver on this machine, started or hot-swapped; `kubernetes`: the "
            "`ModelEndpoint` of that name, rolled out per its strategy (default: the workflow's target)."
        ),
    )
    namespace: str = Field(default="default", description="Namespace of the ModelEndpoint (kubernetes).")
    port: int | None = Field(default=None, ge=1, le=65535, description="Local port when it starts.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Batching limits (local).")
    timeout_s: float = Field(default=900, gt=0, description="Deadline for the endpoint to serve the version.")


class PromoteStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("version", "candidate_endpoint")
    outputs: ClassVar[tuple[str, ...]] = ("version", "endpoint")
    primary_output: ClassVar[str | None] = "version"
    value_outputs: ClassVar[frozenset[str]] = frozenset({"version", "endpoint"})

    kind: Literal["promote"] = Field(description="Move a registry alias after gates pass.")
    registered_name: str = Field(description="Registered model name.", pattern=REGISTERED_NAME_PATTERN)
    version: Ref | None = Field(
        default=None,
        description="Version to promote, e.g. `${stages.register.outputs.version}` (default: `from_alias`).",
    )
    from_alias: str = Field(
        default="candidate", description="Alias whose version is promoted.", pattern=ALIAS_PATTERN
    )
    to_alias: str = Field(default="production", description="Alias to move.", pattern=ALIAS_PATTERN)
    requires: list[str] = Field(
        default_factory=list, description="Stages whose gates must have passed (they become dependencies)."
    )
    gates: PromotionGates = Field(
        default_factory=PromotionGates, description="Checked before the alias moves."
    )
    endpoint: PromoteEndpointSpec | None = Field(
        default=None,
        description="Production endpoint pointed at the version (started if not running, else hot-swapped).",
    )
    candidate_endpoint: Ref | None = Field(
        default=None,
        description="Endpoint serving the version (SLO gate), e.g. `${stages.deploy.outputs.endpoint}`.",
    )

    def refs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.version is not None:
            out["version"] = self.version
        if self.candidate_endpoint is not None:
            out["candidate_endpoint"] = self.candidate_endpoint
        return out

    def extra_needs(self) -> list[str]:
        return list(self.requires)

    def check(self, ctx: SpecContext) -> list[SpecIssue]:
        issues = []
        for j, req in enumerate(self.requires):
            if req == self.name:
                issues.append(SpecIssue(f"requires[{j}]", "a stage cannot require itself"))
            elif req not in ctx.stages:
                issues.append(ctx.unknown_stage(f"requires[{j}]", req))
        for j, gate in enumerate(self.gates.metrics):
            if gate.stage is not None and gate.stage not in ctx.stages:
                issues.append(ctx.unknown_stage(f"gates.metrics[{j}].stage", gate.stage))
        if self.endpoint is not None:
            issues += bf16_thread_issues(
                self.endpoint.scheduler, "endpoint.scheduler.inference_precision", self, ctx
            )
        return issues


DATASET_FORMATS_FOR_METHOD = {
    "sft": ("sft", "text"),
    "lora": ("sft", "text"),
    "qlora": ("sft", "text"),
    "dpo": ("preference",),
}


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


# The built-in kinds; an installed operator package adds its own through its OperatorSpec's
# ``stage_model`` (entry point ``forgeline.operators``): :func:`stage_classes` is the union's source.
STAGE_CLASSES: dict[str, type[StageBase]] = {
    "finetune": FinetuneStage,
    "evaluate": EvaluateStage,
    "quantize": QuantizeStage,
    "build": BuildStage,
    "register": RegisterStage,
    "serve": ServeStage,
    "deploy": DeployStage,
    "promote": PromoteStage,
    "distill": DistillStage,
    "prune": PruneStage,
}
_installed: list[dict[str, type[StageBase]]] = []  # cache of stage_classes()


def stage_classes() -> dict[str, type[StageBase]]:
    """Every stage kind this process knows, by kind: the built-ins, then each installed operator's
    ``stage_model`` (a kind of its own; it may not redefine a built-in one)."""
    if not _installed:
        from forgeline.registry import default_registry

        kinds = dict(STAGE_CLASSES)
        for kind, cls in default_registry().stage_models().items():
            if kind in STAGE_CLASSES and cls is not STAGE_CLASSES[kind]:
                raise TypeError(f"operator package redefines the built-in stage kind {kind!r} ({cls})")
            kinds[kind] = cls
        _installed.append(kinds)
    return _installed[0]


def refresh_stage_kinds() -> None:
    """Forget the installed kinds and rebuild the workflow model (after installing an operator
    package into a running process; a new process sees it anyway)."""
    from forgeline.registry import reset_default_registry

    reset_default_registry()
    _installed.clear()
    Workflow.model_rebuild(force=True)


class _InstalledStages:
    """``list[Stage]`` where Stage is the discriminated union (on ``kind``) of :func:`stage_classes`,
    resolved when the workflow model is first built (it defers its build), so a stage model in an
    operator package (which imports this module) can be part of it."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        stages: Any = list.__class_getitem__(_stage_union())
        return handler.generate_schema(Annotated[stages, Field(min_length=1)])


def _stage_union() -> Any:
    """``Annotated[KindA | KindB | ..., Field(discriminator="kind")]`` over :func:`stage_classes`."""
    classes = tuple(stage_classes().values())
    union: Any = Union.__getitem__(classes)  # a union over a runtime tuple
    return Annotated[union, Field(discriminator="kind")]


def stage_adapter() -> TypeAdapter[Any]:
    """Validates one stage mapping against every installed kind."""
    adapter: TypeAdapter[Any] = TypeAdapter(_stage_union())
    return adapter


class Workflow(StrictModel):
    """A workflow: a base model, named datasets, and stages that run as a DAG."""

    name: str = Field(description="Workflow name (MLflow experiment default).", pattern=NAME_PATTERN)
    description: str | None = Field(default=None, description="Free text.")
    model: ModelSpec = Field(description="The base model.")
    data: dict[str, DatasetSpec] = Field(default_factory=dict, description="Named datasets.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow settings.")
    target: Literal["local", "kubernetes"] = Field(default="local", description="Where endpoints go.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Defaults for stages.")
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, defer_build=True)

    stages: Annotated[list[StageBase], _InstalledStages()] = Field(
        description="Stages, in declaration order."
    )

    def stage(self, name: str) -> StageBase:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def dependencies(self, name: str) -> list[str]:
        """Explicit `needs` (or the previous stage) plus stages referenced by typed fields."""
        names = [s.name for s in self.stages]
        idx = names.index(name)
        stage = self.stages[idx]
        deps: list[str] = []
        if stage.needs is None:
            if idx > 0:
                deps.append(names[idx - 1])
        else:
            deps.extend(stage.needs)
        for ref in stage.refs().values():
            parsed = parse_ref(ref)
            if parsed and parsed[0] != "model" and parsed[0] not in deps:
                deps.append(parsed[0])
        deps.extend(r for r in stage.extra_needs() if r not in deps)
        return deps


def parse_ref(value: str) -> tuple[str, str | None] | None:
    """``${model}`` -> ("model", None); ``${stages.a.outputs.b}`` -> ("a", "b"); a URI -> None."""
    m = REF_PATTERN.match(value.strip())
    if not m:
        return None
    if m.group(1):
        return ("model", None)
    return (m.group(2), m.group(3))


def is_ref_like(value: str) -> bool:
    return value.strip().startswith("${")


def output_ref(stage: str, output: str) -> str:
    return f"${{stages.{stage}.outputs.{output}}}"
