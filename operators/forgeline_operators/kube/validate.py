"""Offline validation of every manifest Forgeline renders, each against its real schema.

* Kubernetes built-ins (Deployment, Service, HPA ``autoscaling/v2``, PDB ``policy/v1``, Job, RBAC, CRDs...):
  ``kubernetes-validate`` in strict mode (unknown fields fail) for Kubernetes
  :data:`~forgeline_operators.lib.kube_builtins.K8S_VERSION`; a kind without a schema there is a
  failure, never a pass (:func:`~forgeline_operators.lib.kube_builtins.validate_builtin`).
* Custom resources, with ``jsonschema`` against their CRD's ``openAPIV3Schema``: ours (``forgeline.dev``,
  generated from the pydantic models), NVIDIA's ``NIMService`` (k8s-nim-operator v3.1.2), Gateway API
  ``HTTPRoute`` v1 (v1.6.1, standard channel), KubeRay ``RayJob`` / ``RayCluster`` (v1.7.0). Objects
  with declared properties are closed, as the API server's strict field validation treats them; the
  OpenAPI 3.0 dialect (``nullable``, boolean ``exclusiveMinimum``, ``x-kubernetes-int-or-string``) is
  mapped onto Draft 4. CEL rules (``x-kubernetes-validations``) are not evaluated here.
* Pod templates inside custom resources (RayJob / RayCluster groups) as a built-in ``v1/PodTemplate``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from forgeline_operators.lib.kube_builtins import validate_builtin

__all__ = ["validate_manifests"]

_HERE = Path(__file__).parent
SCHEMAS = {
    ("apps.nvidia.com/v1alpha1", "NIMService"): _HERE
    / "schemas"
    / "nim-operator-v3.1.2-nimservice-v1alpha1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): _HERE / "schemas" / "gateway-api-v1.6.1-httproute-v1.json",
    ("ray.io/v1", "RayJob"): _HERE.parent / "finetune" / "nemo" / "schemas" / "kuberay-v1.7.0-rayjob-v1.json",
}


def _openapi_to_draft4(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_openapi_to_draft4(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _openapi_to_draft4(v) for k, v in schema.items() if k != "x-kubernetes-validations"}
    if out.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _validator(schema: dict[str, Any]) -> Any:
    import jsonschema

    return jsonschema.Draft4Validator(_openapi_to_draft4(schema))


@cache
def _upstream(key: tuple[str, str]) -> Any:
    return _validator(json.loads(SCHEMAS[key].read_text())["openAPIV3Schema"])


@cache
def _raycluster() -> Any:
    rayjob = json.loads(SCHEMAS[("ray.io/v1", "RayJob")].read_text())["openAPIV3Schema"]
    # KubeRay's RayJob.spec.rayClusterSpec is the same RayClusterSpec type as RayCluster.spec.
    schema = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "spec": rayjob["properties"]["spec"]["properties"]["rayClusterSpec"],
        },
    }
    return _validator(schema)


@cache
def _ours() -> dict[tuple[str, str], Any]:
    from forgeline_operators.kube.crds import crds

    found = {}
    for _name, (_module, crd) in crds().items():
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            found[key] = _validator(version["schema"]["openAPIV3Schema"])
    return found


def _errors(validator: Any, obj: dict[str, Any], where: str) -> list[str]:
    return [
        f"{where}: {'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    ]


def _pod_templates(obj: dict[str, Any], where: str) -> list[str]:
    spec = obj.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec) if obj.get("kind") == "RayJob" else spec
    groups = [("head", cluster.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", [])]
    problems = []
    for name, group in groups:
        if "template" in group:
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "check"},
                "template": copy.deepcopy(group["template"]),
            }
            problems += validate_builtin(wrapped, f"{where} {name} pod template")
    return problems


def _custom(obj: dict[str, Any], where: str) -> list[str] | None:
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    check: Callable[[], Any] | None = None
    if key in _ours():
        check = lambda: _ours()[key]  # noqa: E731
    elif key in SCHEMAS:
        check = lambda: _upstream(key)  # noqa: E731
    elif key == ("ray.io/v1", "RayCluster"):
        check = _raycluster
    if check is None:
        return None
    problems = _errors(check(), obj, where)
    if not obj.get("metadata", {}).get("name"):
        problems.append(f"{where}: metadata.name: required")
    if key[0] == "ray.io/v1":
        problems += _pod_templates(obj, where)
    return problems


def validate_manifests(manifests: list[dict[str, Any]]) -> list[str]:
    """Every problem with ``manifests`` (empty = all valid), each as ``Kind/name: field.path: message``."""
    problems: list[str] = []
    for obj in manifests:
        if not isinstance(obj, dict):
            problems.append(f"not a Kubernetes object: {obj!r:.80}")
            continue
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        custom = _custom(obj, where)
        problems += custom if custom is not None else validate_builtin(obj, where)
    return problems
