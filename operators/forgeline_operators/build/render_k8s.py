"""The TensorRT-LLM build's ``render`` hook for ``forgeline render``: its ``EngineBuild`` and the
build ``Job`` the controller creates for it (unless the engine is cached)."""

from __future__ import annotations

from typing import Any

from forgeline.spec import parse_ref
from forgeline_operators.lib.kube_render import Doc, RenderRefs

__all__ = ["render"]


def render(stage: Any, refs: RenderRefs) -> list[Doc]:
    from forgeline_operators.build import k8s
    from forgeline_operators.engines.tensorrt_llm.settings import TrtllmBuildSpec

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
