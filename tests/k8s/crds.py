"""The CRDs the ``k8s`` tier installs: the real ones (generated from the pydantic models, as in
``k8s/crds/*.yaml``) when they exist, else a minimal structural ``EngineBuild`` CRD of the same shape
(group ``forgeline.dev``, ``v1alpha1``, status subresource) so the server facts can be checked before
the generator lands."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

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
