"""The workflow spec's root and what every stage kind shares: the workflow model (base model,
datasets, tracking, resources, stages), :class:`StageBase` (the fields and hooks each kind inherits),
:class:`SpecContext` / :class:`SpecIssue` for a kind's own checks, name patterns and references.

Every model forbids unknown keys and describes every field (the descriptions feed the JSON Schema in
``workflows/schema.json`` and the reference docs). The stages are a discriminated union on ``kind``
over the installed kinds (:func:`stage_classes`): each kind's model lives with its operator
(``forgeline_operators/<kind>/spec.py``, or a third-party package) and declares its outputs and
primary output, so references such as ``${stages.sft.outputs.merged}`` are checked before anything
runs. Nothing here names a kind.
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
)
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
# A LoRA adapter's served name (the `model` id in OpenAI requests): serve and deploy both check it.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
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


_installed: list[dict[str, type[StageBase]]] = []  # cache of stage_classes()


def stage_classes() -> dict[str, type[StageBase]]:
    """Every stage kind this process knows, by kind: the ``stage_model`` of each installed operator
    (entry point ``forgeline.operators``; the shipped kinds live in ``forgeline_operators/<kind>/
    spec.py``). The platform names no kind: the workflow union, the loader and ``forgeline schema``
    are all built from this."""
    if not _installed:
        from forgeline.registry import default_registry

        kinds = default_registry().stage_models()
        if not kinds:
            raise RuntimeError(
                "no stage kinds are installed: install forgeline-operators (its `forgeline.operators` "
                "entry point declares them)"
            )
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
