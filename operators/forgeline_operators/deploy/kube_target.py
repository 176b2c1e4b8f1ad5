"""The deploy stage's ``target: kubernetes``: build the ``ModelEndpoint`` from the stage (its model URI
from the resolved repository or the stage's ``kubernetes.repository``, the ``kubernetes:`` block, the
rollout), apply it with the operator's field manager, and wait until the endpoint controller reports the
new generation ``Ready`` (the output is the endpoint's in-cluster URL) or ``Degraded``/``Failed`` (the
stage fails with the controller's reason, e.g. the canary gate numbers). The rollout itself happens in
the cluster (:mod:`forgeline_operators.deploy.controller`); this stage only asks for it and watches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from forgeline.runtime.context import OperatorError
from forgeline_operators.deploy.resources import API_VERSION, KIND, EndpointModel, ModelEndpointSpec, to_cr
from forgeline_operators.lib.kube_client import Kube

__all__ = ["deadline_s", "deploy", "endpoint_spec", "model_uri"]

# Schemes pods can read a model from (K1's manifests: object-store copy by init container, or a PVC).
POD_SCHEMES = ("s3://", "gs://", "pvc://")
BASE_DEADLINE_S = 900.0  # pulling a serving image and loading an engine takes minutes on a GPU node


def model_uri(stage: Any, reference: str) -> str:
    """Where the pods read the model: ``kubernetes.repository`` when set, else the stage's repository
    reference when it is already a URI the pods can read; a local directory is refused (pods cannot
    see this machine's disk)."""
    repo = stage.kubernetes.repository if stage.kubernetes else None
    if repo is not None and repo.uri:
        return str(repo.uri)
    if repo is not None and repo.pvc:
        return f"pvc://{repo.pvc}/{repo.path.strip('/')}".rstrip("/")
    if reference.startswith(POD_SCHEMES):
        return reference
    raise OperatorError(
        f"deploy stage {stage.name!r}: the model repository {reference!r} is not a URI the cluster's pods "
        f"can read ({', '.join(POD_SCHEMES)}); publish it to an object store or a PVC and set "
        "`kubernetes.repository: {uri: s3://BUCKET/PATH}` (or `{pvc: NAME, path: DIR}`) on the stage"
    )


def endpoint_spec(stage: Any, reference: str, version: str | None = None) -> ModelEndpointSpec:
    """The ``ModelEndpoint`` spec of a deploy stage (``kubernetes:`` defaults when the block is absent)."""
    fields: dict[str, Any] = {"runtime": stage.runtime, "rollout": stage.rollout}
    fields["model"] = EndpointModel(uri=model_uri(stage, reference), version=version)
    if stage.kubernetes is not None:
        fields["kubernetes"] = stage.kubernetes
    return ModelEndpointSpec(**fields)


def deadline_s(spec: ModelEndpointSpec) -> float:
    """How long a rollout may take: pods starting, plus every canary step's observation window."""
    r = spec.rollout
    windows = r.step_interval_s * len(r.steps) if r.strategy == "canary" else 0
    return BASE_DEADLINE_S + windows


def deploy(
    kube: Kube,
    name: str,
    spec: ModelEndpointSpec,
    timeout_s: float | None = None,
    interval_s: float = 1.0,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Apply endpoint ``name`` and wait until the controller has acted on this generation and it is Ready;
    returns the status. ``OperatorError`` on Degraded/Failed (with the reason) or at the deadline."""
    applied = kube.apply(to_cr(name, spec))
    gen = applied["metadata"].get("generation", 1)
    ns = spec.kubernetes.namespace
    timeout_s = deadline_s(spec) if timeout_s is None else timeout_s
    end = time.monotonic() + timeout_s
    last_phase = None
    status: dict[str, Any] = {}
    while True:
        obj = kube.get(API_VERSION, KIND, name, ns)
        if obj is None:
            raise OperatorError(f"ModelEndpoint {ns}/{name} was deleted while rolling out")
        status = obj.get("status") or {}
        if status.get("observedGeneration", 0) >= gen:
            phase = status.get("phase")
            if phase != last_phase:
                log(f"ModelEndpoint {ns}/{name}: {phase} ({_message(status)})")
                last_phase = phase
            if phase == "Ready":
                return status
            if phase in ("Degraded", "Failed"):
                reason = status.get("rollbackReason") or _message(status)
                raise OperatorError(f"ModelEndpoint {ns}/{name} is {phase}: {reason}")
        if time.monotonic() >= end:
            raise OperatorError(
                f"ModelEndpoint {ns}/{name} not Ready after {timeout_s:g} s (phase {status.get('phase')!r}: "
                f"{_message(status)}); is the forgeline operator running in the cluster "
                "(k8s/ manifests) and are its pods schedulable? `kubectl describe me "
                f"{name} -n {ns}` shows the conditions"
            )
        time.sleep(interval_s)


def _message(status: dict[str, Any]) -> str:
    for c in status.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("status") == "True":
            return str(c.get("message", ""))
    conds = status.get("conditions") or []
    return str(conds[0].get("message", "")) if conds else "no status yet"
