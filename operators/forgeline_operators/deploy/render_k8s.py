"""The deploy kind's ``render`` hook for ``forgeline render``: on ``target: kubernetes``, the
``ModelEndpoint`` and the children its first revision gets at full traffic (what the controller
creates for it)."""

from __future__ import annotations

from typing import Any

from forgeline_operators.deploy.spec import KubernetesDeploySpec
from forgeline_operators.lib.kube_render import Doc, RenderRefs

__all__ = ["render"]


def render(stage: Any, refs: RenderRefs) -> list[Doc]:
    if refs.loaded.workflow.target != "kubernetes":
        return []  # a local endpoint: nothing on a cluster
    from forgeline_operators.deploy import manifests
    from forgeline_operators.deploy.resources import EndpointModel, ModelEndpointSpec, revision_of, to_cr

    wf = refs.loaded.workflow
    uri, note = refs.resolve(stage.repository)
    kube = stage.kubernetes or KubernetesDeploySpec(namespace=refs.settings.namespace)
    spec = ModelEndpointSpec(
        runtime=stage.runtime, model=EndpointModel(uri=uri), rollout=stage.rollout, kubernetes=kube
    )
    name = (stage.endpoint_name or wf.name).replace("_", "-")
    rev = revision_of(spec)
    notes = [note] if note else []
    first = [f"first revision {rev}: what the controller creates for it at 100% traffic"]
    docs = [Doc(to_cr(name, spec, labels={"forgeline.dev/workflow": wf.name.replace("_", "-")}), notes)]
    children = manifests.revision_children(name, spec, rev, kube.replicas)
    children += [manifests.stable_service(name, spec, rev), manifests.http_route(name, spec, {rev: 100})]
    docs += [Doc(c, first + notes) for c in children]
    return docs
