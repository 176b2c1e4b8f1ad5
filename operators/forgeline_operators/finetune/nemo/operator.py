"""``run(ctx)`` of the finetune stage, backend ``nemo``: NVIDIA's NeMo trainers as container jobs.

The stage writes the job into the shared directory (``nemo.shared_dir``, default the stage's work dir):
``data/`` (train/validation JSON lines in the trainer's field names) and ``job/`` (``run.sh``, the
trainer config, ``ray_job.json``, ``rayjob.yaml``, ``job.yaml``), validates every launch object against
its real schema, and copies the same files to the stage log and to ``spec/`` in the stage directory.

Then it launches where the workflow says: ``target: local`` submits a Ray job in the trainer image
(needs GPUs in the Ray cluster and podman for Ray's ``image_uri``), polls it to the end, and publishes
the HF result the job exported (``merged`` for sft/dpo, ``adapter`` for lora); ``target: kubernetes``
applies the KubeRay ``RayJob`` (or Service + indexed Job, ``nemo.launcher``) to the configured cluster
and waits on its status (:mod:`.kube_launch`), then reads the result from the shared directory. Where
that cannot happen -- no GPU or no container runtime, as on the CPU machine this is developed on, no
cluster configured, no KubeRay -- it stops with :data:`STOP` naming what is missing. The Ray-job path
has never run here (no GPU); the Kubernetes path ran against a real API server with the test in
KubeRay's and the trainer's place, never with the NeMo containers.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from forgeline.artifacts import UriError, parse_uri
from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline.spec import parse_ref
from forgeline_operators.finetune.nemo import launch, validate
from forgeline_operators.finetune.nemo.metrics import MetricTail
from forgeline_operators.finetune.nemo.render import JobInputs, Rendered, RenderError, render

__all__ = ["STOP", "model_location", "prepare", "rendering_for", "run", "trainer_rows"]

STOP = (
    "backend nemo runs {trainer} {release} in {image} on {gpus} GPU(s); {missing}. The job was rendered "
    "and validated (files in {job_dir}, and in the stage log): {how}"
)
POLL_S = 30.0


def model_location(ctx: StageContext, ref: str) -> str:
    """A hub id for ``hf://`` models (the container downloads), else the resolved local directory."""
    parsed = parse_ref(ref)
    uri = ctx.workflow.model.base if parsed and parsed[0] == "model" else ref
    if parse_ref(uri) is None:
        try:
            u = parse_uri(uri, Path.cwd())
        except UriError:
            u = None
        if u is not None and u.scheme == "hf":
            return str(u.target).split("@", 1)[0]
    return str(ctx.input_path(ref))


def trainer_rows(
    method: str, rows: list[dict[str, Any]], dataset: str, rendering: str = "raw"
) -> list[dict[str, Any]]:
    """Rows in the trainer's field names: Megatron-Bridge ``messages`` (chat template) or input/output
    (raw); NeMo-RL prompt/chosen/rejected (its tokenizer config renders them)."""
    out = []
    for i, row in enumerate(rows, 1):
        if method == "dpo":
            out.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
        elif rendering == "chat_template" and "messages" in row:
            out.append({"messages": row["messages"]})
        elif rendering == "chat_template" and "prompt" in row and "completion" in row:
            # The same conversation every other stage renders from a prompt/completion row.
            user, assistant = {"role": "user", "content": row["prompt"]}, {"role": "assistant"}
            out.append({"messages": [user, assistant | {"content": row["completion"]}]})
        elif "prompt" in row and "completion" in row:
            out.append({"input": row["prompt"], "output": row["completion"]})
        else:
            raise OperatorError(
                f"dataset {dataset!r} row {i}: backend nemo sft/lora renders raw rows from prompt/completion "
                "(Megatron-Bridge's preloaded JSONL); chat `messages` rows need the chat template "
                "(the dataset's rendering: chat_template or auto, with a model that has one)"
            )
    return out


def rendering_for(dataset: str, requested: str, model: str) -> str:
    """``chat_template`` or ``raw`` for the trainer, decided as every other stage decides it
    (:func:`forgeline_operators.data.resolve_rendering`) from the model's tokenizer -- a local
    directory, or a hub id already in the hub cache (the container downloads the weights)."""
    from transformers import AutoTokenizer

    from forgeline_operators.data import resolve_rendering

    if requested == "raw":
        return "raw"
    try:
        local = Path(model).is_dir()
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=not local)
    except (OSError, ValueError) as e:
        raise OperatorError(
            f"dataset {dataset!r} has rendering: {requested}, and the tokenizer of {model} is not available "
            f"here to check its chat template ({type(e).__name__}: a hub model's tokenizer files must be in "
            f"the hub cache); set data.{dataset}.rendering to chat_template or raw"
        ) from None
    try:
        return resolve_rendering(tokenizer, requested)
    except ValueError as e:
        raise OperatorError(f"dataset {dataset!r}: {e}") from None


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prepare(ctx: StageContext) -> tuple[Rendered, JobInputs, dict[str, Any], Path]:
    """Write data + job files to the shared dir, validate every launch object; returns what was rendered."""
    from forgeline_operators.lib.train_rows import split_rows

    stage = ctx.stage
    nemo = stage.nemo
    shared = Path(nemo.shared_dir) if nemo and nemo.shared_dir else ctx.work_dir / "nemo"
    train, held = split_rows(
        ctx, stage.dataset, stage.eval_dataset, stage.training.eval_fraction, stage.training.seed
    )
    model = model_location(ctx, stage.base)
    rendering = rendering_for(stage.dataset, ctx.dataset(stage.dataset).rendering, model)
    ctx.log_params({"rendering": rendering})
    job = JobInputs(
        name=launch.k8s_name(ctx.workflow.name, stage.name),
        model=model,
        shared_dir=str(shared),
        train_rows=len(train),
        eval_rows=len(held),
        tracking_uri=ctx.tracking_uri,
        experiment=ctx.workflow.tracking.experiment or ctx.workflow.name,
        run_name=f"{ctx.workflow.name}/{stage.name}",
        rendering=rendering,
    )
    try:
        rendered = render(stage, job)
        objects = _launch_objects(stage, rendered, job)
    except RenderError as e:
        raise OperatorError(str(e)) from e
    problems = validate.validate_ray_job(objects["ray_job"]) if "ray_job" in objects else []
    if "rayjob" in objects:
        problems += validate.validate_rayjob(objects["rayjob"])
    if "job" in objects:
        problems += validate.validate_k8s(objects["job"])
    if problems:
        raise OperatorError("rendered NeMo job failed validation: " + "; ".join(problems))
    names = (
        ("training.jsonl", "validation.jsonl")
        if stage.method != "dpo"
        else ("train.jsonl", "validation.jsonl")
    )
    _write_jsonl(shared / "data" / names[0], trainer_rows(stage.method, train, stage.dataset, rendering))
    if held:
        rows = trainer_rows(stage.method, held, stage.eval_dataset or stage.dataset, rendering)
        _write_jsonl(shared / "data" / names[1], rows)
    files = dict(rendered.files)
    if "ray_job" in objects:
        files["ray_job.json"] = json.dumps(objects["ray_job"], indent=2) + "\n"
    if "rayjob" in objects:
        files["rayjob.yaml"] = yaml.safe_dump(objects["rayjob"], sort_keys=False)
    if "job" in objects:
        files["job.yaml"] = yaml.safe_dump_all(objects["job"], sort_keys=False)
    job_dir = shared / "job"
    spec_dir = ctx.output_dir / "spec"
    for d in (job_dir, spec_dir):
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text)
    (job_dir / "run.sh").chmod(0o755)
    return rendered, job, objects, job_dir


def _launch_objects(stage: Any, r: Rendered, job: JobInputs) -> dict[str, Any]:
    """The launch objects this stage can use (a layout that one launcher cannot run is left out of it)."""
    objects: dict[str, Any] = {}
    errors = []
    for key, build in (
        ("ray_job", lambda: launch.ray_job(r, job)),
        ("rayjob", lambda: launch.rayjob_manifest(stage, r, job)),
        ("job", lambda: launch.job_manifests(stage, r, job)),
    ):
        try:
            objects[key] = build()
        except RenderError as e:
            errors.append(str(e))
    if not objects:
        raise RenderError("; ".join(errors))
    return objects


def _missing(ctx: StageContext, r: Rendered, objects: dict[str, Any]) -> tuple[str | None, str]:
    """(what is missing, how to run it instead), or (None, "") when the Ray job can be submitted here."""
    if "ray_job" not in objects:
        return ("a Ray job cannot run this layout", "use target: kubernetes with nemo.launcher: job")
    missing = []
    if shutil.which("podman") is None:
        missing.append("no podman on this node (Ray's image_uri runtime_env starts the image with podman)")
    gpus = _cluster_gpus()
    if gpus is None:
        missing.append(f"the Ray cluster did not report its resources within {_RAY_QUERY_TIMEOUT_S:g} s")
    elif gpus < r.gpus_per_node:
        missing.append(f"the Ray cluster has {gpus:g} GPUs, the job needs {r.gpus_per_node} on one node")
    how = "run the workflow against a GPU Ray cluster (--ray-address) or apply rayjob.yaml / job.yaml"
    return ("; ".join(missing) or None, how)


_RAY_QUERY_TIMEOUT_S = 10.0


def _cluster_gpus() -> float | None:
    """GPUs of the Ray cluster this stage runs in (0 without Ray); None when the GCS does not answer in
    time -- the query blocks on a future without a deadline, and a stage must never hang on it."""
    import threading

    import ray

    if not ray.is_initialized():
        return 0.0
    box: list[float] = []
    query = threading.Thread(
        target=lambda: box.append(float(ray.cluster_resources().get("GPU", 0))), daemon=True
    )
    query.start()
    query.join(_RAY_QUERY_TIMEOUT_S)
    return box[0] if box else None


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    rendered, _, objects, job_dir = prepare(ctx)
    for name in sorted(rendered.files):
        print(f"--- {name}\n{rendered.files[name]}")
    # Tags, not params: the driver already logged the stage's own ``nemo.*`` fields as params.
    ctx.set_tags(
        {
            "forgeline.nemo.trainer": f"{rendered.trainer} {rendered.release}",
            "forgeline.nemo.image": rendered.image,
            "forgeline.nemo.layout": f"{rendered.nodes}x{rendered.gpus_per_node} GPUs",
            "forgeline.nemo.iterations": str(rendered.iterations),
        }
    )

    def stop(missing: str, how: str) -> OperatorError:
        return OperatorError(
            STOP.format(
                trainer=rendered.trainer,
                release=rendered.release,
                image=rendered.image,
                gpus=rendered.world_size,
                missing=missing,
                job_dir=job_dir,
                how=how,
            )
        )

    # The trainer's own metrics, from its output, into this stage's run at the trainer's steps.
    tail = MetricTail(rendered.trainer, lambda metrics, step: ctx.log_metrics(metrics, step=step))
    try:
        if ctx.workflow.target == "kubernetes":
            _run_on_kubernetes(ctx, objects, stop, tail)
        else:
            missing, how = _missing(ctx, rendered, objects)
            if missing is not None:
                raise stop(missing, how)
            _submit_and_wait(objects["ray_job"], stage.timeout_minutes, tail)
    finally:
        tail.flush(final=True)  # a failed job's metrics are the first thing to look at
    outputs: dict[str, Path | str | int | float] = {}
    for name, path in rendered.outputs.items():
        src = Path(path)
        if not (src / "config.json").is_file() and not (src / "adapter_config.json").is_file():
            raise OperatorError(f"the job finished but wrote no HF checkpoint at {src}")
        shutil.copytree(src, ctx.output_dir / name)
        outputs[name] = ctx.output_dir / name
    return StageResult(
        outputs=outputs,
        metrics={"iterations": float(rendered.iterations), "trainer_metrics_logged": float(tail.logged)},
    )


def _run_on_kubernetes(
    ctx: StageContext, objects: dict[str, Any], stop: Callable[[str, str], OperatorError], tail: MetricTail
) -> None:
    """Apply the RayJob (or Service + indexed Job) to the configured cluster and wait for it."""
    from forgeline_operators.finetune.nemo.kube_launch import LaunchFailed, run_on_cluster
    from forgeline_operators.lib.kube_client import NoCluster, connect

    launcher = ctx.stage.nemo.launcher if ctx.stage.nemo else "rayjob"
    key, manifest = ("rayjob", "rayjob.yaml") if launcher == "rayjob" else ("job", "job.yaml")
    how = f"kubectl apply -f {manifest}"
    if key not in objects:
        raise stop(f"this layout cannot run as nemo.launcher: {launcher}", "pick the other launcher")
    try:
        kube = connect()
    except NoCluster:
        raise stop(
            "no Kubernetes cluster is configured (KUBECONFIG, ~/.kube/config or in-cluster)", how
        ) from None
    to_apply = [objects["rayjob"]] if key == "rayjob" else list(objects["job"])
    timeout_s = (ctx.stage.timeout_minutes or 7 * 24 * 60) * 60
    try:
        run_on_cluster(
            kube, to_apply, timeout_s=timeout_s, poll_s=POLL_S, log=ctx.logger.info, on_lines=tail.feed
        )
    except LaunchFailed as e:
        raise stop(str(e), how) from None


def _submit_and_wait(submission: dict[str, Any], timeout_minutes: float | None, tail: MetricTail) -> None:
    """Submit to the connected Ray cluster and poll to a terminal state, feeding the job's new output
    lines to ``tail`` on every poll (never run here: no GPU)."""
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray.get_runtime_context().gcs_address)
    job_id = client.submit_job(**submission)
    deadline = time.monotonic() + (timeout_minutes or 7 * 24 * 60) * 60
    offset = 0

    def new_lines() -> None:
        nonlocal offset
        text = client.get_job_logs(job_id)
        end = text.rfind("\n", offset) + 1  # whole lines only; a partial one waits for the next poll
        if end > offset:
            tail.feed(text[offset:end].splitlines())
            offset = end

    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        new_lines()
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(POLL_S)  # a remote job's state: nothing to wait on but the API
    else:
        client.stop_job(job_id)
        raise OperatorError(f"Ray job {job_id} did not finish within {timeout_minutes} minutes (stopped)")
    print(client.get_job_logs(job_id)[-20000:])
    if status != JobStatus.SUCCEEDED:
        raise OperatorError(f"Ray job {job_id} ended {status}")
