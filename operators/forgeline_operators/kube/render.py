"""``forgeline render``: every Kubernetes object a workflow would create, without a cluster, for GitOps.

Per stage, what its operator's ``render`` hook returns (the kind's own module: ``deploy/render_k8s.py``
gives a ``ModelEndpoint`` and its first revision's children on ``target: kubernetes``,
``build/render_k8s.py`` a TensorRT-LLM ``EngineBuild`` and its ``Job``, ``finetune/nemo/render_k8s.py``
a ``RayJob`` or indexed ``Job``). ``on_kubernetes`` adds the ``ConfigMap`` + KubeRay ``RayJob`` that
runs the whole workflow on the cluster.

A reference to a stage output that does not exist yet becomes a placeholder under the artifact root
(``pvc://CLAIM/PATH/WORKFLOW/STAGE/OUTPUT``) and the object carries a YAML comment saying so;
``forgeline run --target kubernetes`` fills in the real values.
"""

from __future__ import annotations

import yaml

from forgeline.registry import OperatorRegistry, default_registry
from forgeline.spec import LoadedWorkflow
from forgeline_operators.lib.kube_render import Doc, RenderRefs, RenderSettings

__all__ = ["Doc", "RenderSettings", "render_workflow", "to_yaml"]


def render_workflow(
    loaded: LoadedWorkflow, settings: RenderSettings, registry: OperatorRegistry | None = None
) -> list[Doc]:
    """Every object of the workflow, in stage order (raises ValueError subclasses naming the fix).
    A stage contributes what its operator's ``render`` hook returns (none: nothing on a cluster)."""
    refs = RenderRefs(loaded, settings)
    registry = registry or default_registry()
    docs: list[Doc] = []
    for stage in loaded.workflow.stages:
        op = registry.operator(str(getattr(stage, "kind")), stage.backend_name())  # noqa: B009
        hook = op.load_render() if op is not None else None
        if hook is not None:
            docs += hook(stage, refs)
    if settings.on_kubernetes:
        from forgeline_operators.kube.submit import submission

        # Exactly what `forgeline run FILE --on kubernetes` applies: workflow + datasets, then the RayJob.
        configmap, rayjob = submission(
            loaded, namespace=settings.namespace, artifacts_pvc=settings.artifacts_pvc
        )
        docs.append(
            Doc(configmap, ["the workflow file and its datasets, at their relative paths under /workflows"])
        )
        docs.append(
            Doc(rayjob, ["runs the whole workflow on its own Ray cluster (KubeRay), then tears it down"])
        )
    return docs


def to_yaml(docs: list[Doc], header: str) -> str:
    """A multi-document YAML stream; each document's notes as ``#`` comments above it."""
    parts = []
    for doc in docs:
        comments = "".join(f"# {n}\n" for n in doc.notes)
        parts.append(comments + yaml.safe_dump(doc.obj, sort_keys=False, width=110))
    return f"# {header}\n" + "---\n".join(parts)
