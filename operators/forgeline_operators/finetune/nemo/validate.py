"""Validation of the launch objects against their real schemas, before anything is submitted.

* Kubernetes built-ins (``Job``, ``Service``, and every pod template, also the ones inside a RayJob, as
  a ``v1/PodTemplate``): ``kubernetes-validate`` in strict mode (unknown fields fail) against
  :data:`K8S_VERSION`; a missing schema is a failure, never a pass.
* ``RayJob``: KubeRay v1.7.0's CRD ``openAPIV3Schema`` (``schemas/kuberay-v1.7.0-rayjob-v1.json``) with
  ``jsonschema``; objects with declared properties are closed, as the API server's strict field
  validation (``fieldValidation=Strict``) treats them, unless the CRD preserves unknown fields.
* The Ray job: its ``runtime_env`` through Ray's own ``RuntimeEnv`` parser, its keywords against
  ``JobSubmissionClient.submit_job``'s signature.
"""

from __future__ import annotations

import copy
import inspect
import json
from functools import cache
from pathlib import Path
from typing import Any

# Built-in kinds are checked by the one validator every Kubernetes manifest of Forgeline goes through.
from forgeline_operators.lib.kube_builtins import K8S_VERSION
from forgeline_operators.lib.kube_builtins import validate_builtin as _builtin

__all__ = ["K8S_VERSION", "validate_k8s", "validate_ray_job", "validate_rayjob"]

RAYJOB_SCHEMA = Path(__file__).parent / "schemas" / "kuberay-v1.7.0-rayjob-v1.json"


def _pod_template(template: dict[str, Any], where: str) -> list[str]:
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    return _builtin(wrapped, where)


def validate_k8s(manifests: list[dict[str, Any]]) -> list[str]:
    """Problems with built-in manifests (strict, Kubernetes 1.31); their pod templates included."""
    problems: list[str] = []
    for m in manifests:
        where = f"{m.get('kind')}/{m.get('metadata', {}).get('name')}"
        problems += _builtin(m, where)
        template = m.get("spec", {}).get("template")
        if m.get("kind") == "Job" and template:
            problems += _pod_template(template, f"{where} pod template")
    return problems


def _close(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _close(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_close(v) for v in schema]
    return schema


@cache
def _rayjob_validator() -> Any:
    import jsonschema

    schema = _close(json.loads(RAYJOB_SCHEMA.read_text())["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def validate_rayjob(manifest: dict[str, Any]) -> list[str]:
    """Problems with a RayJob against the KubeRay CRD (strict), and with its pod templates (built-in)."""
    problems = []
    if (manifest.get("apiVersion"), manifest.get("kind")) != ("ray.io/v1", "RayJob"):
        problems.append(f"not a ray.io/v1 RayJob: {manifest.get('apiVersion')}/{manifest.get('kind')}")
    for e in sorted(_rayjob_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        problems.append(f"RayJob: {'.'.join(str(p) for p in e.absolute_path)}: {e.message}")
    cluster = manifest.get("spec", {}).get("rayClusterSpec", {})
    groups = [("head", cluster.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", [])]
    for name, group in groups:
        if "template" in group:
            problems += _pod_template(copy.deepcopy(group["template"]), f"RayJob {name} pod template")
    return problems


def validate_ray_job(submission: dict[str, Any]) -> list[str]:
    """Problems with ``submit_job`` keywords (Ray's own signature and RuntimeEnv parser)."""
    from ray.job_submission import JobSubmissionClient
    from ray.runtime_env import RuntimeEnv

    params = inspect.signature(JobSubmissionClient.submit_job).parameters
    problems = [f"submit_job has no argument {k!r}" for k in submission if k not in params]
    try:
        RuntimeEnv(**submission.get("runtime_env", {}))
    except (TypeError, ValueError) as e:
        problems.append(f"runtime_env: {e}")
    return problems
