"""What ``forgeline plan`` shows for a ``backend: nemo`` stage: the trainer, image, recipe or config, where
it would run (Ray job, KubeRay RayJob or Kubernetes Job; nodes x GPUs) and the steps, rendered with the
same functions the stage runs -- so a key the trainer release does not have, or a layout the chosen
launcher cannot run, is a plan problem before anything starts. Imports neither torch nor ray.
"""

from __future__ import annotations

from typing import Any

from forgeline.spec import parse_ref
from forgeline_operators.finetune.nemo import launch
from forgeline_operators.finetune.nemo.render import JobInputs, render

__all__ = ["describe"]


def _model(stage: Any, workflow: Any) -> str:
    parsed = parse_ref(stage.base)
    uri = workflow.model.base if parsed and parsed[0] == "model" else stage.base
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://").split("@", 1)[0]
    return uri if parse_ref(uri) is None else f"{uri} (HF export of that stage)"


def describe(stage: Any, workflow: Any) -> list[str]:
    """Lines for the plan; raises ValueError (RenderError) when the stage cannot become a NeMo job."""
    nemo = stage.nemo
    job = JobInputs(
        name=launch.k8s_name(workflow.name, stage.name),
        model=_model(stage, workflow),
        shared_dir=(nemo.shared_dir if nemo and nemo.shared_dir else "<stage work dir>"),
        train_rows=1,  # iterations come from the data at run time
        eval_rows=1,
    )
    r = render(stage, job)
    par = stage.parallelism
    layout = f"{r.nodes} node(s) x {r.gpus_per_node} GPUs (tp{par.tp} x pp{par.pp} x dp{par.dp})"
    if workflow.target == "kubernetes":
        launcher = nemo.launcher if nemo else "rayjob"
        if launcher == "rayjob":
            launch.rayjob_manifest(stage, r, job)
            where = f"KubeRay RayJob {job.name}"
        else:
            launch.job_manifests(stage, r, job)
            where = f"indexed Job + headless Service {job.name}"
        where += f" in namespace {nemo.namespace if nemo else 'default'}"
    else:
        launch.ray_job(r, job)
        where = "a Ray job (runtime_env image_uri) on the Ray cluster"
    if r.trainer == "megatron-bridge":
        what = f"Megatron-Bridge {r.release} recipe {r.recipe}"
        steps = "HF -> Megatron import, torchrun run_recipe.py, export " + (
            "PEFT adapter" if "adapter" in r.outputs else "HF checkpoint"
        )
    else:
        what = f"NeMo-RL {r.release} examples/run_dpo.py (Megatron policy)"
        steps = "run_dpo.py, convert_megatron_to_hf.py on the last step"
    spec = workflow.data.get(stage.dataset)
    requested = spec.rendering if spec is not None else "auto"
    rendering = (
        requested
        if requested != "auto"
        else "auto (chat_template when the model's tokenizer has one; decided when the stage runs)"
    )
    return [f"{what} in {r.image}", f"on {where}: {layout}", f"steps: {steps}", f"rendering: {rendering}"]
