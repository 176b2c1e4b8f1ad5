"""The workflow spec: typed models, YAML loading with positions, located errors, JSON Schema export.

Everything a user writes in a workflow file is parsed here, once, into frozen pydantic models; every
problem is reported at once as ``file:line:col: field: message``. Nothing here imports Ray, MLflow or
torch, so ``forgeline validate`` is instant.
"""

from forgeline.spec._errors import Problem, WorkflowError, did_you_mean
from forgeline.spec._loader import LoadedWorkflow, SourceMap, load_workflow
from forgeline.spec._models import (
    ALIAS_PATTERN,
    BASE_MODEL_REF,
    EXPERIMENT_PATTERN,
    NAME_PATTERN,
    REGISTERED_NAME_PATTERN,
    DatasetSpec,
    ModelSpec,
    StageBase,
    Workflow,
    output_ref,
    parse_ref,
    refresh_stage_kinds,
    stage_adapter,
    stage_classes,
)
from forgeline.spec._schema import reference_markdown, schema_json

__all__ = [
    "ALIAS_PATTERN",
    "BASE_MODEL_REF",
    "EXPERIMENT_PATTERN",
    "NAME_PATTERN",
    "REGISTERED_NAME_PATTERN",
    "DatasetSpec",
    "LoadedWorkflow",
    "ModelSpec",
    "Problem",
    "SourceMap",
    "StageBase",
    "Workflow",
    "WorkflowError",
    "did_you_mean",
    "load_workflow",
    "output_ref",
    "parse_ref",
    "reference_markdown",
    "refresh_stage_kinds",
    "schema_json",
    "stage_adapter",
    "stage_classes",
]
