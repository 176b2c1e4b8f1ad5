"""The CRDs the ``k8s`` tier installs: the real ones (generated from the pydantic models, as in
``k8s/crds/*.yaml``) when they exist, else a minimal structural ``EngineBuild`` CRD of the same shape
(group ``forgeline.dev``, ``v1alpha1``, status subresource) so the server facts can be checked before
the generator lands."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from forgeline_operators.finetune.nemo.validate import RAYJOB_SCHEMA

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "k8s" / "crds"

_OBJ: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
MINIMAL_ENGINE_BUILD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "enginebuilds.forgeline.dev"},
    "spec": {
        "group": "forgeline.dev",
        "scope": "Namespaced",
        "names": {
            "plural": "enginebuilds",
            "singular": "enginebuild",
            "kind": "EngineBuild",
            "shortNames": ["eb"],
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["checkpoint", "cacheKey", "output", "tensorrtLLM"],
                                "properties": {
                                    "engine": {"type": "string", "enum": ["tensorrt-llm"]},
                                    "checkpoint": {
                                        "type": "object",
                                        "required": ["path"],
                                        "properties": {
                                            "path": {"type": "string"},
                                            "sha256": {"type": "string"},
                                        },
                                    },
                                    "tensorrtLLM": _OBJ,
                                    "cacheKey": {"type": "string", "minLength": 1},
                                    "output": {
                                        "type": "object",
                                        "required": ["path"],
                                        "properties": {"path": {"type": "string"}},
                                    },
                                    "image": {"type": "string"},
                                    "gpus": {"type": "integer", "minimum": 1},
                                    "nodeSelector": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                    "tolerations": {"type": "array", "items": _OBJ},
                                },
                            },
                            "status": _OBJ,
                        },
                    }
                },
            }
        ],
    },
}


def crd_documents() -> list[dict[str, Any]]:
    """The CRDs generated from the pydantic models (what ``k8s/crds/*.yaml`` holds), else those files,
    else the minimal EngineBuild one."""
    try:
        from forgeline_operators.kube.crds import crds

        return [obj for _module, obj in crds().values()]
    except ImportError:
        pass
    docs: list[dict[str, Any]] = []
    for f in sorted(CRD_DIR.glob("*.yaml")) if CRD_DIR.is_dir() else []:
        docs += [
            d for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") == "CustomResourceDefinition"
        ]
    return docs or [MINIMAL_ENGINE_BUILD]


def install(api: client.ApiClient, docs: list[dict[str, Any]], deadline_s: float = 30) -> list[str]:
    """Create (or replace) the CRDs and wait until each is Established; returns their names."""
    ext = client.ApiextensionsV1Api(api)
    names = []
    for d in docs:
        name = d["metadata"]["name"]
        try:
            ext.create_custom_resource_definition(d)
        except client.ApiException as e:
            if e.status != 409:
                raise
            cur = ext.read_custom_resource_definition(name)
            ext.replace_custom_resource_definition(
                name, {**d, "metadata": {**d["metadata"], "resourceVersion": cur.metadata.resource_version}}
            )
        names.append(name)
    end = time.monotonic() + deadline_s
    for name in names:
        while True:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                break
            if time.monotonic() > end:
                raise AssertionError(f"CRD {name} not Established after {deadline_s} s: {conds}")
            time.sleep(0.1)
    return names


def _drop_empty_defaults(node: object) -> object:
    """This 1.20 server reads ``default: ""`` in a CRD schema as null and rejects it (newer servers do
    not; K1's generator leaves such defaults out for the same reason): drop them from KubeRay's schema,
    and the map-list markers whose keys relied on them (server-side apply then merges those lists
    atomically here)."""
    if isinstance(node, dict):
        out = {k: _drop_empty_defaults(v) for k, v in node.items() if not (k == "default" and v == "")}
        if out.get("x-kubernetes-list-type") == "map":  # its keys need the defaults just dropped
            out.pop("x-kubernetes-list-type")
            out.pop("x-kubernetes-list-map-keys", None)
        return out
    if isinstance(node, list):
        return [_drop_empty_defaults(v) for v in node]
    return node


def rayjob_crd() -> dict[str, object]:
    schema: Any = _drop_empty_defaults(json.loads(RAYJOB_SCHEMA.read_text())["openAPIV3Schema"])
    # The stored schema leaves KubeRay's status out (it does not affect validating what we write): keep
    # whatever status the test writes in KubeRay's place (jobStatus, jobDeploymentStatus, message).
    schema["properties"]["status"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "rayjobs.ray.io"},
        "spec": {
            "group": "ray.io",
            "scope": "Namespaced",
            "names": {"plural": "rayjobs", "singular": "rayjob", "kind": "RayJob"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }
