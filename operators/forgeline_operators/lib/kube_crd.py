"""Pydantic models -> Kubernetes custom resources: the CRD (``apiextensions.k8s.io/v1``) with a
*structural* ``openAPIV3Schema``, and the camelCase wire form of a model's values (``to_wire`` /
``from_wire``).

One source of truth: the models the workflow YAML uses (snake_case) become the CR's fields in camelCase,
as the Kubernetes API conventions want; map keys (labels, adapter names, revisions) are data and never
renamed. A field whose ``json_schema_extra`` carries ``VERBATIM`` keeps its value's keys as they are
(e.g. ``EngineBuild.spec.tensorrtLLM``: the build settings are handed to the build entrypoint unchanged).

Structural schema rules applied (the API server rejects a CRD otherwise): every ``$ref`` inlined, a type
on every node, ``X | None`` as ``nullable: true`` (never ``anyOf`` with null), ``int | str`` as
``x-kubernetes-int-or-string``, free-form values as ``x-kubernetes-preserve-unknown-fields``, no
``additionalProperties: false`` (the server's strict field validation rejects unknown fields instead),
OpenAPI v3.0 ``exclusiveMinimum``/``exclusiveMaximum`` booleans, ``const`` as a one-value ``enum``.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

from pydantic import BaseModel

__all__ = ["VERBATIM", "PrinterColumn", "camel", "crd", "from_wire", "structural_schema", "to_wire"]

VERBATIM = "x-forgeline-verbatim"
_DROP = {
    "title",
    "additionalProperties",
    "patternProperties",
    "uniqueItems",
    "discriminator",
    "$defs",
    "examples",
}


def camel(name: str) -> str:
    """``max_surge_gpus`` -> ``maxSurgeGpus``; a name without ``_`` is kept (``tensorrtLLM``); a ``_s``
    suffix (seconds) becomes ``Seconds``, the API conventions' unit suffix for durations."""
    if name.endswith("_s"):
        name = name[:-2] + "_seconds"
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


# ------------------------------------------------------------------------------------------- schema


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = _resolve(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
            # Keep the referring field's own description/default next to the inlined model.
            return {**target, **{k: _resolve(v, defs) for k, v in node.items() if k != "$ref"}}
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _camel_keys(value: Any, schema: dict[str, Any]) -> Any:
    """A default value in wire form: object keys camelCased where the schema declares properties."""
    if isinstance(value, dict) and "properties" in schema and not schema.get(VERBATIM):
        return {camel(k): _camel_keys(v, schema["properties"].get(k, {})) for k, v in value.items()}
    return value


def _structural(node: dict[str, Any], verbatim: bool = False) -> dict[str, Any]:
    node = dict(node)
    verbatim = verbatim or bool(node.get(VERBATIM))
    meta = {k: node.pop(k) for k in ("description", "default") if k in node}
    branches = node.pop("anyOf", None) or node.pop("oneOf", None)
    out: dict[str, Any]
    nullable = False
    if branches:
        kept = [b for b in branches if b.get("type") != "null"]
        nullable = len(kept) < len(branches)
        types_ = {b.get("type") for b in kept}
        if len(kept) == 1:
            out = _structural({**kept[0], **node}, verbatim)
        elif types_ <= {"integer", "string"} and all(set(b) <= {"type", "pattern"} for b in kept):
            out = {"x-kubernetes-int-or-string": True}
        elif all("enum" in b or "const" in b for b in kept) and len(types_) == 1:
            values = [v for b in kept for v in (b.get("enum") or [b.get("const")])]
            out = {"type": types_.pop(), "enum": values}
        else:
            # A union the API server cannot type (e.g. a string or a list): accept any value here,
            # the workflow model still validates it before it is written.
            out = {"x-kubernetes-preserve-unknown-fields": True}
    else:
        out = {}
        for key, value in node.items():
            if key in _DROP or key == VERBATIM:
                continue
            if key == "properties":
                props = value
                out["properties"] = {
                    (k if verbatim else camel(k)): _structural(v, verbatim) for k, v in props.items()
                }
            elif key == "required":
                out["required"] = [k if verbatim else camel(k) for k in value]
            elif key == "items":
                out["items"] = _structural(value, verbatim)
            elif key == "const":
                out["enum"] = [value]
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[bound] = value
                out[key] = True
            else:
                out[key] = value
        extra = node.get("additionalProperties")
        if node.get("patternProperties"):
            # Structural schemas have no patternProperties: the key pattern is checked by the models.
            extra = next(iter(node["patternProperties"].values()))
        if out.get("type") == "object" and "properties" not in out:
            if isinstance(extra, dict) and extra:
                out["additionalProperties"] = _structural(extra, verbatim)
            else:
                out["x-kubernetes-preserve-unknown-fields"] = True
        if not out or ("type" not in out and "x-kubernetes-int-or-string" not in out):
            out.setdefault("x-kubernetes-preserve-unknown-fields", True)
    if nullable:
        out["nullable"] = True
    if "description" in meta:
        out["description"] = meta["description"]
    # Empty defaults are left to the models: kube-apiserver 1.20 reads a default of "" as null and
    # rejects the CRD ("must be of type string").
    if meta.get("default") not in (None, "", [], {}):
        out["default"] = meta["default"] if verbatim else _camel_keys(meta["default"], out)
    return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural ``openAPIV3Schema`` node of ``model`` (camelCase properties, refs inlined)."""
    raw = model.model_json_schema(by_alias=True)
    resolved = _resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    return _structural(resolved)


# --------------------------------------------------------------------------------------------- CRD


class PrinterColumn(typing.NamedTuple):
    name: str
    json_path: str
    type: str = "string"


def crd(
    *,
    group: str,
    version: str,
    kind: str,
    plural: str,
    short_names: list[str],
    spec: type[BaseModel],
    status: type[BaseModel],
    columns: list[PrinterColumn],
    description: str,
) -> dict[str, Any]:
    """A namespaced CRD with one served+stored version, the status subresource and printer columns."""
    schema = {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": structural_schema(spec),
            "status": structural_schema(status),
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["forgeline"],
            },
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": c.name, "type": c.type, "jsonPath": c.json_path} for c in columns
                    ],
                }
            ],
        },
    }


# ------------------------------------------------------------------------------------------- values


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for arg in [annotation, *typing.get_args(annotation)]:
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if typing.get_origin(arg) is typing.Annotated:
            found = _model_of(typing.get_args(arg)[0])
            if found:
                return found
    return None


def _container_item(annotation: Any) -> tuple[str, Any] | None:
    """("dict", value type) / ("list", item type) for ``dict[...]`` / ``list[...]`` (also optional)."""
    candidates = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = list(typing.get_args(annotation))
    for c in candidates:
        origin = typing.get_origin(c)
        if origin is dict:
            return ("dict", typing.get_args(c)[1])
        if origin is list:
            return ("list", typing.get_args(c)[0])
    return None


def _is_verbatim(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(VERBATIM))


def to_wire(value: Any) -> Any:
    """A model's values in CR form: camelCase field names, ``None`` and empty defaults left out, map
    keys unchanged."""
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            if item is None or field.exclude:
                continue
            if item == "" and field.default == "":
                # Left out like None: the default comes back on read, and some API servers (1.20)
                # store "" in a custom resource as null and then reject it as not a string.
                continue
            key = camel(field.alias or name)
            out[key] = (
                value.model_dump(mode="json", include={name})[name] if _is_verbatim(field) else to_wire(item)
            )
        return out
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value


def _from(data: Any, annotation: Any) -> Any:
    model = _model_of(annotation)
    if model is not None and isinstance(data, dict):
        by_key = {camel(f.alias or n): (n, f) for n, f in model.model_fields.items()}
        out = {}
        for key, item in data.items():
            if key not in by_key:
                out[key] = item  # left for pydantic to reject with the field's name
                continue
            name, field = by_key[key]
            out[field.alias or name] = item if _is_verbatim(field) else _from(item, field.annotation)
        return out
    container = _container_item(annotation)
    if container and container[0] == "dict" and isinstance(data, dict):
        return {k: _from(v, container[1]) for k, v in data.items()}
    if container and container[0] == "list" and isinstance(data, list):
        return [_from(v, container[1]) for v in data]
    return data


def from_wire(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """Parse a CR's ``spec`` / ``status`` (camelCase) into ``model`` (raises pydantic's ValidationError)."""
    return model.model_validate(_from(copy.deepcopy(data), model))
