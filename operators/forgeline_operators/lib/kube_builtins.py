"""Strict offline validation of one Kubernetes built-in object (Deployment, Service, HPA, PDB, Job,
RBAC, ``v1/PodTemplate``...) against the Kubernetes :data:`K8S_VERSION` schemas of
``kubernetes-validate``: unknown fields fail, and a kind without a schema is a failure, never a pass.
It owns the Kubernetes version every rendered manifest is checked for. The stages that render their
own objects (the NeMo launcher's Job / RayJob pod templates) check them with it;
:mod:`forgeline_operators.kube.validate` adds the custom resources (ours and upstream CRDs) on top.
"""

from __future__ import annotations

from typing import Any

__all__ = ["K8S_VERSION", "validate_builtin"]

K8S_VERSION = "1.31"


def validate_builtin(obj: dict[str, Any], where: str) -> list[str]:
    """Problems with one built-in object (strict, Kubernetes :data:`K8S_VERSION`; no schema = a problem)."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except SchemaNotFoundError:
        return [f"{where}: no Kubernetes {K8S_VERSION} schema for {obj.get('apiVersion')}/{obj.get('kind')}"]
    except ValidationError as e:
        return [f"{where}: {'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"]
    return []
