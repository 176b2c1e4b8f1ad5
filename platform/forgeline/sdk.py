"""The operator SDK: what an operator package -- the shipped ``forgeline_operators`` or a third
party's -- needs from the platform, in one public module.

A stage kind is a stage model (:class:`StageBase` subclass), a ``run(ctx)`` entrypoint taking a
:class:`StageContext` and returning a :class:`StageResult`, and an :class:`OperatorSpec` naming both
plus its plan hooks (``resources`` -> :class:`ResourceRequest`, ``estimate`` ->
:class:`StageEstimate`, ``check`` -> :class:`StageIssue` list, ``describe``, ``render``,
``cache_check``); docs/architecture.md walks through adding one, and
``tests/plugin_kind/forgeline_datacheck`` is a complete example. Everything here is re-exported from
the module that owns it, so these names are the stable surface and the modules behind them may move.
Errors an operator raises derive from :class:`ForgelineError` (:class:`OperatorError`,
:class:`GateFailed`): their message is shown to the user as written.
"""

from __future__ import annotations

from forgeline.errors import ForgelineError
from forgeline.plan import (
    EstimateInputs,
    GiB,
    MemoryEstimate,
    ModelShape,
    StageEstimate,
    dataset_size,
    finetune_memory,
    inference_memory,
    training_flops,
)
from forgeline.registry import Capabilities, OperatorSpec, ResourceRequest, StageIssue
from forgeline.runtime.context import (
    DatasetInput,
    GateFailed,
    MetricSink,
    OperatorError,
    StageContext,
    StageResult,
)
from forgeline.spec import StageBase, parse_ref
from forgeline.spec._models import (
    ADAPTER_NAME_PATTERN,
    ALIAS_PATTERN,
    BASE_MODEL_REF,
    DNS_LABEL_PATTERN,
    NAME_PATTERN,
    REGISTERED_NAME_PATTERN,
    DatasetSpec,
    Ref,
    SpecContext,
    SpecIssue,
    StrictModel,
    is_ref_like,
    output_ref,
    stage_classes,
)

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "ALIAS_PATTERN",
    "BASE_MODEL_REF",
    "DNS_LABEL_PATTERN",
    "NAME_PATTERN",
    "REGISTERED_NAME_PATTERN",
    "Capabilities",
    "DatasetInput",
    "DatasetSpec",
    "EstimateInputs",
    "ForgelineError",
    "GateFailed",
    "GiB",
    "MemoryEstimate",
    "MetricSink",
    "ModelShape",
    "OperatorError",
    "OperatorSpec",
    "Ref",
    "ResourceRequest",
    "SpecContext",
    "SpecIssue",
    "StageBase",
    "StageContext",
    "StageEstimate",
    "StageIssue",
    "StageResult",
    "StrictModel",
    "dataset_size",
    "finetune_memory",
    "inference_memory",
    "is_ref_like",
    "output_ref",
    "parse_ref",
    "stage_classes",
    "training_flops",
]
