"""Generated artifacts of the spec: the JSON Schema for editors (``workflows/schema.json``) and the
workflow reference (``docs/workflow-reference.md``), both from the same pydantic models."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from forgeline.spec._models import StageBase, Workflow, stage_classes


def schema_json() -> str:
    schema = Workflow.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Forgeline workflow"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, __import__("types").UnionType):
        return " \\| ".join(_type_name(a) for a in args if a is not type(None)) + (
            " \\| null" if type(None) in args else ""
        )
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if tp is StageBase:  # the stage union: every installed kind
        return " \\| ".join(cls.__name__ for cls in stage_classes().values())
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _default(f: FieldInfo) -> str:
    if f.default is PydanticUndefined:
        if f.default_factory is not None:
            value = f.default_factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                return "(defaults below)"
            return f"`{json.dumps(value)}`"
        return "**required**"
    return f"`{json.dumps(f.default)}`"


def _table(model: type[BaseModel], seen: set[str], out: list[str], title: str) -> None:
    if model.__name__ in seen:
        return
    seen.add(model.__name__)
    out += [f"### {title}", "", "| field | type | default | description |", "|---|---|---|---|"]
    nested: list[type[BaseModel]] = []
    for name, f in model.model_fields.items():
        if f.exclude:
            continue
        out.append(
            f"| `{f.alias or name}` | {_type_name(f.annotation)} | {_default(f)} | {f.description or ''} |"
        )
        for t in _flatten(f.annotation):
            if isinstance(t, type) and issubclass(t, BaseModel) and not hasattr(t, "outputs"):
                nested.append(t)
    outputs = getattr(model, "outputs", None)
    if outputs:
        out += ["", f"Outputs: {', '.join(f'`{o}`' for o in outputs)} (primary: `{model.primary_output}`)."]  # type: ignore[attr-defined]
    out.append("")
    for t in nested:
        _table(t, seen, out, t.__name__)


def _flatten(tp: Any) -> list[Any]:
    args = typing.get_args(tp)
    if not args:
        return [tp]
    found: list[Any] = []
    for a in args:
        found += _flatten(a)
    return found


def reference_markdown() -> str:
    """The workflow reference, generated from the models (do not edit the output by hand)."""
    out = [
        "# Workflow reference",
        "",
        "Generated from `forgeline.spec` by `forgeline schema`; a test fails when it is stale.",
        "References: `${stages.NAME.outputs.KEY}` (an earlier stage's output), `${model}` (the workflow's",
        "base model), or a model URI (path, `hf://`, `s3://`, `mlflow://models/NAME@ALIAS`, `builtin://NAME`).",
        "",
        "## Workflow",
        "",
    ]
    seen: set[str] = set()
    _table(Workflow, seen, out, "Workflow (top level)")
    out += [
        "## Stages",
        "",
        "Every stage has `name`, `kind`, `needs`, `resources`, `cache`, `timeout_minutes`.",
        "",
    ]
    for kind, cls in stage_classes().items():
        _table(cls, seen, out, f"`kind: {kind}`")
    return "\n".join(out).rstrip() + "\n"
