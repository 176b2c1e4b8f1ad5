"""The production endpoint on the kubernetes target: promotion changes the ``ModelEndpoint``'s model and
waits for the endpoint controller's rollout (rolling or canary, per the resource's ``rollout``).

The resource must exist (a deploy stage on ``target: kubernetes`` created it). Promotion merge-patches
``spec.model`` (URI, sha256, registry label) and waits until the controller has observed that
generation and reports the new revision ``Ready`` and current. If the rollout fails (a canary gate
rolls it back: phase ``Degraded`` with ``rollbackReason``) or the deadline passes, ``spec.model`` is
patched back to what it was, so the resource again describes what serves, and promotion raises --
the registry alias does not move.
"""

from __future__ import annotations

from typing import Any

from forgeline_operators.deploy.endpoint import EndpointError
from forgeline_operators.deploy.resources import API_VERSION, KIND, from_cr, revision_of
from forgeline_operators.lib.kube_client import Kube, wait_for
from forgeline_operators.lib.kube_crd import to_wire

__all__ = ["point_model_endpoint"]


def _patch_model(kube: Kube, name: str, namespace: str, model: dict[str, Any]) -> dict[str, Any]:
    res = kube.resource(API_VERSION, KIND)
    out = res.patch(
        body={"spec": {"model": model}},
        name=name,
        namespace=namespace,
        content_type="application/merge-patch+json",
    )
    return dict(out.to_dict())


def point_model_endpoint(
    kube: Kube,
    name: str,
    namespace: str,
    *,
    uri: str,
    sha256: str | None,
    version_label: str,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Roll the ``ModelEndpoint`` ``namespace/name`` out to ``uri``; returns its status once Ready.

    Raises :class:`EndpointError` (with the controller's reason) when the rollout does not complete;
    the resource's model is restored first.
    """
    obj = kube.get(API_VERSION, KIND, name, namespace)
    if obj is None:
        raise EndpointError(
            f"no ModelEndpoint {namespace}/{name}: deploy it first (a deploy stage on target: kubernetes), "
            "then promote versions onto it"
        )
    spec, status = from_cr(obj)
    new_model = spec.model.model_copy(update={"uri": uri, "sha256": sha256, "version": version_label})
    revision = revision_of(spec.model_copy(update={"model": new_model}))
    if status.current_revision == revision and status.phase == "Ready" and not status.canary_revision:
        return dict(obj.get("status") or {})
    old_wire, new_wire = to_wire(spec.model), to_wire(new_model)
    # A merge patch keeps map entries it does not mention: clear adapters the new model does not have.
    for adapter in old_wire.get("adapters", {}):
        new_wire.setdefault("adapters", {}).setdefault(adapter, None)
    generation = int(_patch_model(kube, name, namespace, new_wire)["metadata"]["generation"])

    def settled() -> tuple[str, dict[str, Any]] | None:
        current = kube.get(API_VERSION, KIND, name, namespace) or {}
        _, st = from_cr(current)
        if (st.observed_generation or 0) < generation:
            return None
        if st.phase == "Ready" and st.current_revision == revision and not st.canary_revision:
            return "ready", dict(current.get("status") or {})
        if st.phase in ("Degraded", "Failed") and st.current_revision != revision and not st.canary_revision:
            return "failed", dict(current.get("status") or {})
        return None

    try:
        outcome, result = wait_for(
            settled, timeout_s, f"ModelEndpoint {namespace}/{name} revision {revision}"
        )
    except TimeoutError as e:
        _restore(kube, name, namespace, old_wire, new_wire)
        raise EndpointError(f"{e}; spec.model restored to {old_wire.get('uri')}") from None
    if outcome == "failed":
        _restore(kube, name, namespace, old_wire, new_wire)
        reason = result.get("rollbackReason") or result.get("phase")
        raise EndpointError(
            f"the rollout of {uri} on ModelEndpoint {namespace}/{name} was rolled back: {reason}"
        )
    return result


def _restore(kube: Kube, name: str, namespace: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    restored = dict(old)
    for key in new:
        restored.setdefault(key, None)  # drop fields only the new model had (merge patch: null deletes)
    for adapter in new.get("adapters") or {}:
        restored.setdefault("adapters", {}).setdefault(adapter, None)
    _patch_model(kube, name, namespace, restored)
