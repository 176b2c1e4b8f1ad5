"""The evaluate stage's model: metrics, gates (absolute and paired vs a baseline model) and the
lm-evaluation-harness tasks. The operator's ``stage_model``.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from forgeline.sdk import (
    BASE_MODEL_REF,
    Ref,
    SpecContext,
    SpecIssue,
    StageBase,
    StrictModel,
    is_ref_like,
    output_ref,
    stage_classes,
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
