"""A third-party operator package, written as a user would write one, for
``tests/integration/test_plugin_kind.py``: a ``datacheck`` stage kind that refuses a dataset whose rows
contain blocked terms. It brings its own stage model, plan hooks (GPUs, a check), operator and
Kubernetes rendering, and Forgeline finds all of it through the ``forgeline.operators`` entry point
(the test installs a ``.dist-info`` for it), with no edit to Forgeline."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from forgeline.sdk import Capabilities, OperatorSpec, ResourceRequest, StageBase, StageIssue

__all__ = ["DatacheckStage", "check", "operator_specs", "render", "resources"]


class DatacheckStage(StageBase):
    dataset_fields: ClassVar[tuple[str, ...]] = ("dataset",)
    outputs: ClassVar[tuple[str, ...]] = ("report",)
    primary_output: ClassVar[str | None] = "report"

    kind: Literal["datacheck"] = Field(description="Refuse a dataset whose rows contain blocked terms.")
    dataset: str = Field(description="Name of a dataset under `data:`.")
    blocked: list[str] = Field(default_factory=list, description="Terms (whole words, case-insensitive).")
    max_flagged: float = Field(
        default=0.0, ge=0, le=1, description="Largest share of rows that may hold one."
    )
    gpus: int = Field(default=0, ge=0, description="GPUs it asks for on a GPU workflow.")


def operator_specs() -> list[OperatorSpec]:
    return [
        OperatorSpec(
            kind="datacheck",
            entrypoint="forgeline_datacheck.operator:run",
            version="1",
            capabilities=Capabilities(cpu=True, gpu=True),
            description="Blocked terms in a dataset (a plugin kind).",
            stage_model="forgeline_datacheck:DatacheckStage",
            resources="forgeline_datacheck:resources",
            check="forgeline_datacheck:check",
            render="forgeline_datacheck:render",
        )
    ]


def resources(stage: Any, workflow: Any, caps: Capabilities) -> ResourceRequest:
    return ResourceRequest(gpus=stage.gpus)


def check(stage: Any, workflow: Any, caps: Capabilities) -> list[StageIssue]:
    if not stage.blocked:
        return [StageIssue("blocked is empty: the stage checks nothing", field="blocked", warning=True)]
    return []


def render(stage: Any, refs: Any) -> list[Any]:
    from forgeline_operators.lib.kube_render import Doc

    name = f"{refs.loaded.workflow.name}-{stage.name}-blocklist"
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {"blocked": "\n".join(stage.blocked)},
    }
    return [Doc(obj, ["the blocklist a cluster-side check would mount"])]
