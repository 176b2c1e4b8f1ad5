"""``forgeline render``: every Kubernetes object a workflow would create, without a cluster, for GitOps.

Per stage: a ``deploy`` stage (workflow ``target: kubernetes``) gives its ``ModelEndpoint`` and the
children its first revision gets at full traffic (the controller creates the same); a ``build`` stage
with ``engine: tensorrt-llm`` its ``EngineBuild`` and build ``Job``; a ``finetune`` stage with
``backend: nemo`` its ``RayJob`` or indexed ``Job`` (``nemo.launcher``). ``on_kubernetes`` adds the
``ConfigMap`` + KubeRay ``RayJob`` that runs the whole workflow on the cluster.

A reference to a stage output that does not exist yet becomes a placeholder under the artifact root
(``pvc://CLAIM/PATH/WORKFLOW/STAGE/OUTPUT``) and the object carries a YAML comment saying so;
``forgeline run --target kubernetes`` fills in the real values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from forgeline.spec import LoadedWorkflow
from forgeline.spec._models import BuildStage, DeployStage, FinetuneStage, KubernetesDeploySpec, parse_ref

__all__ = ["Doc", "RenderSettings", "render_workflow", "to_yaml"]


@dataclass(frozen=True)
class RenderSettings:
    namespace: str = "default"
    artifacts_pvc: str = "forgeline-artifacts"
    artifact_dir: str = "home/outputs"  # inside the PVC; the volume is mounted at /artifacts
    on_kubernetes: bool = False


@dataclass
class Doc:
    obj: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class _Refs:
    def __init__(self, loaded: LoadedWorkflow, settings: RenderSettings) -> None:
        self.loaded, self.settings = loaded, settings

    def resolve(self, value: str) -> tuple[str, str | None]:
        """(pvc:// URI or model id, note when it is a placeholder)."""
        parsed = parse_ref(value)
        if parsed is None:
            return value, None
        if parsed[0] == "model":
            return self.loaded.workflow.model.base, None
        stage, output = parsed
        uri = self.uri(stage, output or "output")
        return uri, f"placeholder: {value} is not produced yet; rendered as {uri}"

    def rel(self, stage: str, output: str) -> str:
        return f"{self.settings.artifact_dir.strip('/')}/{self.loaded.workflow.name}/{stage}/{output}"

    def uri(self, stage: str, output: str) -> str:
        return f"pvc://{self.settings.artifacts_pvc}/{self.rel(stage, output)}"

    def path(self, stage: str, output: str) -> str:
        return f"/artifacts/{self.rel(stage, output)}"


def _deploy(stage: DeployStage, refs: _Refs) -> list[Doc]:
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


def _build(stage: BuildStage, refs: _Refs) -> list[Doc]:
    from forgeline.spec._models import TrtllmBuildSpec
    from forgeline_operators.build import k8s

    checkpoint, note = refs.resolve(stage.from_)
    parsed = parse_ref(stage.from_)
    if parsed and parsed[1]:
        checkpoint = refs.path(parsed[0], parsed[1])  # the Job sees the artifact volume at /artifacts
    settings = (stage.tensorrt_llm or TrtllmBuildSpec()).model_dump(mode="json")
    wf = refs.loaded.workflow
    resource = k8s.engine_build(
        f"{wf.name}-{stage.name}",
        namespace=refs.settings.namespace,
        checkpoint=checkpoint,
        checkpoint_sha256="0" * 64,
        settings=settings,
        cache_key="unplanned",
        output=refs.path(stage.name, "artifact"),
        workflow=wf.name,
    )
    notes = [
        "placeholder: checkpoint sha256 and cacheKey are computed by `forgeline run --target kubernetes` "
        "from the built checkpoint",
        *([note] if note else []),
    ]
    job = k8s.engine_build_job(resource, volume_claim=refs.settings.artifacts_pvc)
    return [
        Doc(resource, notes),
        Doc(job, [*notes, "the controller creates this Job unless the engine is cached"]),
    ]


def _rows(loaded: LoadedWorkflow, dataset: str | None) -> int:
    if not dataset:
        return 0
    path = loaded.dataset_path(dataset)
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def _finetune(stage: FinetuneStage, refs: _Refs) -> list[Doc]:
    from forgeline_operators.finetune.nemo import launch
    from forgeline_operators.finetune.nemo.render import JobInputs, render

    loaded = refs.loaded
    wf = loaded.workflow
    base, note = refs.resolve(stage.base)
    if note:
        parsed = parse_ref(stage.base)
        assert parsed and parsed[1]
        base = refs.path(parsed[0], parsed[1])
    rows = _rows(loaded, stage.dataset)
    held = _rows(loaded, stage.eval_dataset) or int(rows * stage.training.eval_fraction)
    shared = (stage.nemo.shared_dir if stage.nemo else None) or refs.path(stage.name, "nemo")
    job = JobInputs(
        name=launch.k8s_name(wf.name, stage.name),
        model=base,
        shared_dir=shared,
        train_rows=max(rows - held, 1),
        eval_rows=held,
        tracking_uri=wf.tracking.uri if (wf.tracking.uri or "").startswith("http") else None,
        experiment=wf.tracking.experiment or wf.name,
        run_name=f"{wf.name}/{stage.name}",
    )
    rendered = render(stage, job)
    notes = [
        f"the job script and data are written to {shared} by the stage before launch",
        *([note] if note else []),
    ]
    launcher = stage.nemo.launcher if stage.nemo else "rayjob"
    objs = (
        [launch.rayjob_manifest(stage, rendered, job)]
        if launcher == "rayjob"
        else launch.job_manifests(stage, rendered, job)
    )
    return [Doc(o, notes) for o in objs]


def render_workflow(loaded: LoadedWorkflow, settings: RenderSettings) -> list[Doc]:
    """Every object of the workflow, in stage order (raises ValueError subclasses naming the fix)."""
    refs = _Refs(loaded, settings)
    wf = loaded.workflow
    docs: list[Doc] = []
    for stage in wf.stages:
        if isinstance(stage, DeployStage) and wf.target == "kubernetes":
            docs += _deploy(stage, refs)
        elif isinstance(stage, BuildStage) and stage.engine == "tensorrt-llm":
            docs += _build(stage, refs)
        elif isinstance(stage, FinetuneStage) and stage.backend == "nemo":
            docs += _finetune(stage, refs)
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
