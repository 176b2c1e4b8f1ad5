"""The nemo finetune's ``render`` hook for ``forgeline render``: its KubeRay ``RayJob`` or indexed
``Job`` (``nemo.launcher``), built from the same job inputs the stage uses at run time."""

from __future__ import annotations

from typing import Any

from forgeline.spec import parse_ref
from forgeline_operators.lib.kube_render import Doc, RenderRefs, dataset_rows

__all__ = ["render"]


def render(stage: Any, refs: RenderRefs) -> list[Doc]:
    from forgeline_operators.finetune.nemo import launch
    from forgeline_operators.finetune.nemo.render import JobInputs, render

    loaded = refs.loaded
    wf = loaded.workflow
    base, note = refs.resolve(stage.base)
    if note:
        parsed = parse_ref(stage.base)
        assert parsed and parsed[1]
        base = refs.path(parsed[0], parsed[1])
    rows = dataset_rows(loaded, stage.dataset)
    held = dataset_rows(loaded, stage.eval_dataset) or int(rows * stage.training.eval_fraction)
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
