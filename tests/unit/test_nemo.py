"""backend nemo: rendered trainer configs, job scripts and launch objects (golden files), validated
against the real schemas (trainer keys of the pinned releases, KubeRay's RayJob CRD, Kubernetes 1.31
strict, Ray's own runtime_env parser), and the stage stopping on a machine without GPUs.

Regenerate the golden files with ``FORGELINE_UPDATE_GOLDEN=1 pytest tests/unit/test_nemo.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from forgeline.runtime.context import DatasetInput, MemorySink, OperatorError, StageContext
from forgeline.spec import Workflow
from forgeline_operators.finetune.nemo import keys, launch, render, validate
from forgeline_operators.finetune.nemo.operator import STOP, run

GOLDEN = Path(__file__).parent.parent / "data" / "golden" / "nemo"
DATA = Path(__file__).parent.parent.parent / "workflows" / "data"
SHARED = "/mnt/forgeline/wf"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FORGELINE_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed (FORGELINE_UPDATE_GOLDEN=1 rewrites it)"


def stage(**kw: Any) -> Any:
    body = {"name": "tune", "kind": "finetune", "backend": "nemo", "dataset": "d", **kw}
    body.setdefault("training", {"precision": "bf16"})
    wf = Workflow.model_validate(
        {"name": "wf", "model": {"base": "hf://x/y"}, "data": {"d": {"path": "d.jsonl", "format": "sft"}},
         "stages": [body]}
    )  # fmt: skip
    return wf.stages[0]


def job(model: str = "meta-llama/Meta-Llama-3-70B", **kw: Any) -> render.JobInputs:
    args: dict[str, Any] = {"name": "wf-tune", "model": model, "shared_dir": SHARED, "train_rows": 400}
    args |= {"eval_rows": 80, "tracking_uri": "http://mlflow.mlops:5000", "experiment": "wf"}
    return render.JobInputs(**(args | kw))


LORA_70B = {
    "method": "lora",
    "merge": False,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
    "parallelism": {"tp": 4, "pp": 2},
    "training": {"precision": "bf16", "epochs": 2, "micro_batch_size": 1, "grad_accum": 8,
                 "max_seq_len": 4096, "gradient_checkpointing": True, "checkpoint_every_steps": 50},
    "nemo": {"pvc": "finetune-shared", "namespace": "training"},
    "timeout_minutes": 720,
}  # fmt: skip


def test_lora_tp4pp2_renders_megatron_bridge_job_and_rayjob_golden() -> None:
    st = stage(**LORA_70B)
    r = render.render(st, job())
    assert (r.trainer, r.release, r.image) == ("megatron-bridge", "v0.5.0", "nvcr.io/nvidia/nemo:26.06")
    assert (r.nodes, r.gpus_per_node, r.world_size, r.iterations) == (1, 8, 8, 100)  # ceil(400*2/8)
    assert r.config["model.tensor_model_parallel_size"] == 4
    assert r.config["model.pipeline_model_parallel_size"] == 2
    assert r.config["peft.target_modules"] == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert r.outputs == {"adapter": f"{SHARED}/out/adapter"}
    check_golden("lora_tp4pp2.run.sh", r.files["run.sh"])
    check_golden("lora_tp4pp2.overrides.yaml", r.files["overrides.yaml"])
    manifest = launch.rayjob_manifest(st, r, job())
    assert validate.validate_rayjob(manifest) == []
    worker = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == 1
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert manifest["spec"]["activeDeadlineSeconds"] == 720 * 60
    check_golden("lora_tp4pp2.rayjob.yaml", yaml.safe_dump(manifest, sort_keys=False))
    submission = launch.ray_job(r, job())
    assert validate.validate_ray_job(submission) == []
    assert submission["runtime_env"]["image_uri"] == "nvcr.io/nvidia/nemo:26.06"
    assert submission["entrypoint_num_gpus"] == 8
    check_golden("lora_tp4pp2.ray_job.json", json.dumps(submission, indent=2) + "\n")


def test_multi_node_sft_is_an_indexed_job_with_headless_service_golden() -> None:
    st = stage(method="sft", parallelism={"tp": 8, "pp": 2, "dp": 2}, nemo={"launcher": "job"})
    r = render.render(st, job(model="/mnt/forgeline/models/llama3-70b", tracking_uri=None))
    assert (r.nodes, r.gpus_per_node, r.world_size) == (4, 8, 32)
    assert r.config["train.global_batch_size"] == 16  # micro 8 x accum 1 x dp 2
    assert not any(k.startswith("logger.mlflow") for k in r.config)  # sqlite is not reachable from pods
    assert "--nnodes=4" in r.files["run.sh"] and "recipe llama3_70b_sft_config" in r.files["run.sh"]
    manifests = launch.job_manifests(st, r, job())
    assert validate.validate_k8s(manifests) == []
    service, k8s_job = manifests
    assert service["spec"]["clusterIP"] == "None"
    assert k8s_job["spec"]["completions"] == k8s_job["spec"]["parallelism"] == 4
    assert k8s_job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    check_golden("sft_4node.job.yaml", yaml.safe_dump_all(manifests, sort_keys=False))
    with pytest.raises(render.RenderError, match=r"nemo\.launcher: job"):
        launch.rayjob_manifest(st, r, job())
    with pytest.raises(render.RenderError, match="one torchrun on one node"):
        launch.ray_job(r, job())


def test_dpo_renders_nemo_rl_config_with_megatron_policy_golden() -> None:
    st = stage(method="dpo", dpo={"beta": 0.2}, parallelism={"tp": 2, "pp": 2, "dp": 2},
               training={"precision": "bf16", "micro_batch_size": 2, "grad_accum": 4,
                         "max_seq_len": 2048})  # fmt: skip
    r = render.render(st, job(model="meta-llama/Llama-3.1-8B-Instruct"))
    assert (r.trainer, r.image, r.nodes) == ("nemo-rl", "nvcr.io/nvidia/nemo-rl:v0.7.0", 1)
    megatron = r.config["policy"]["megatron_cfg"]
    assert (megatron["tensor_model_parallel_size"], megatron["pipeline_model_parallel_size"]) == (2, 2)
    assert r.config["dpo"]["reference_policy_kl_penalty"] == 0.2
    assert r.config["policy"]["train_global_batch_size"] == 16
    assert keys.check_dpo_config(r.config) == []
    check_golden("dpo_tp2pp2.dpo.yaml", r.files["dpo.yaml"])
    check_golden("dpo_tp2pp2.run.sh", r.files["run.sh"])
    manifest = launch.rayjob_manifest(st, r, job())
    assert manifest["spec"]["entrypointNumGpus"] == 0  # NeMo-RL places its own GPU workers
    assert validate.validate_rayjob(manifest) == []
    with pytest.raises(render.RenderError, match="rayjob"):
        launch.job_manifests(st, r, job())


def test_trainer_key_checks_name_the_wrong_key_and_the_fix() -> None:
    bad = stage(method="sft", nemo={"overrides": {"train.train_iter": 5, "optimiser.lr": 1.0}})
    with pytest.raises(render.RenderError) as e:
        render.render(bad, job())
    assert "train.train_iter: train has no field 'train_iter'" in str(e.value)
    assert "did you mean train_iters" in str(e.value)
    assert "no ConfigContainer section 'optimiser'" in str(e.value) and "optimizer" in str(e.value)
    ok = stage(method="sft", nemo={"overrides": {"model.sequence_parallel": True, "train.manual_gc": True}})
    assert render.render(ok, job()).config["model.sequence_parallel"] is True
    dpo = stage(method="dpo", nemo={"overrides": {"policy.megatron_cfg.tensor_parallel_size": 2}})
    with pytest.raises(render.RenderError, match=r"not a NeMo-RL v0\.7\.0 DPO config key"):
        render.render(dpo, job())
    assert keys.check_dpo_config({"policy": {"optimizer": None}}) == []  # whole subtrees may be set


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "sft", "training": {"precision": "fp32"}}, "set bf16"),
        ({"method": "dpo", "dpo": {"loss": "ipo"}}, "sigmoid loss only"),
        ({"method": "dpo", "lora": {"r": 8}}, "drop lora"),
        ({"method": "lora", "merge": False, "lora": {"target_modules": ["q_proj", "qkv"]}}, "knows"),
        ({"method": "lora"}, "set merge: false"),
        ({"method": "sft", "parallelism": {"tp": 4, "pp": 3}}, "whole number of 8-GPU nodes"),
        (
            {"method": "sft", "nemo": {"recipe": "llama9_1b_sft_config"}},
            "not a Megatron-Bridge v0.5.0 recipe",
        ),
    ],
)
def test_stages_that_cannot_be_nemo_jobs_say_why(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(render.RenderError, match=match):
        render.render(stage(**kw), job())


def test_recipe_comes_from_the_model_name_or_must_be_set() -> None:
    assert render.default_recipe("meta-llama/Meta-Llama-3-70B", "lora") == "llama3_70b_peft_config"
    assert render.default_recipe("meta-llama/Llama-3.1-8B-Instruct", "sft") == "llama31_8b_sft_config"
    assert render.default_recipe("meta-llama/Llama-3.2-1B", "lora") == "llama32_1b_peft_config"
    assert render.default_recipe("Qwen/Qwen3-8B", "sft") is None
    with pytest.raises(render.RenderError, match=r"set nemo\.recipe"):
        render.render(stage(method="sft"), job(model="/models/my-model"))


def test_schema_checks_catch_typos_and_missing_schemas() -> None:
    st = stage(**LORA_70B)
    r = render.render(st, job())
    manifest = launch.rayjob_manifest(st, r, job())
    manifest["spec"]["entrypointNumGPUs"] = 1
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("minReplicas")
    problems = validate.validate_rayjob(manifest)
    assert any("'entrypointNumGPUs' was unexpected" in p for p in problems)
    assert any("'minReplicas' is a required property" in p for p in problems)
    _, k8s_job = launch.job_manifests(st, r, job())
    k8s_job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount" in p for p in validate.validate_k8s([k8s_job]))
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert validate.validate_k8s([unknown]) == [
        "Widget/w: no Kubernetes 1.31 schema for example.com/v1/Widget"
    ]
    assert validate.validate_ray_job({"entrypoint": "x", "runtime_env": {"image_uri": 3}, "gpus": 1})


def test_shipped_schemas_name_their_sources() -> None:
    rayjob = json.loads(validate.RAYJOB_SCHEMA.read_text())
    assert rayjob["source"]["tag"] == "v1.7.0" and len(rayjob["source"]["commit"]) == 40
    bridge = json.loads((keys.SCHEMAS / "megatron-bridge-v0.5.0-keys.json").read_text())
    assert bridge["source"]["megatron_bridge"]["commit"].startswith("fcbb6031")
    assert "tensor_model_parallel_size" in bridge["sections"]["model"]
    assert "llama3_70b_peft_config" in bridge["recipes"]


def context(
    tmp_path: Path,
    method: str,
    data: str,
    fmt: str,
    rendering: str = "raw",
    base: str = "hf://meta-llama/Meta-Llama-3-8B",
    **kw: Any,
) -> StageContext:
    """A stage context; ``rendering`` raw by default (the hub model's tokenizer is not here to decide)."""
    path = DATA / data
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    body = {"name": "tune", "kind": "finetune", "backend": "nemo", "method": method, "dataset": "d", **kw}
    body.setdefault("training", {"precision": "bf16"})
    wf = Workflow.model_validate(
        {"name": "wf", "model": {"base": base},
         "data": {"d": {"path": str(path), "format": fmt, "rendering": rendering}}, "stages": [body]}
    )  # fmt: skip
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    return StageContext(
        stage=wf.stages[0], workflow=wf, output_dir=out, work_dir=work, sink=MemorySink(),
        resolve=lambda ref: Path(base) if Path(base).is_dir() else tmp_path / "unused",
        values=lambda ref: None, datasets={"d": DatasetInput("d", path, fmt, digest, rendering)},
    )  # fmt: skip


def _chat_tokenizer(path: Path) -> Path:
    """A small HF tokenizer directory with a chat template (the model itself never loads here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "user": 3, "assistant": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    fast.chat_template = template
    fast.save_pretrained(path)
    return path


def test_chat_template_rendering_gives_the_trainers_the_models_template(tmp_path: Path) -> None:
    """rendering auto + a model with a chat template: Megatron-Bridge gets `messages` rows and its
    HF-template chat dataset, NeMo-RL the tokenizer's default template; both recorded in the params."""
    model = _chat_tokenizer(tmp_path / "model")
    ctx = context(
        tmp_path / "sft", "sft", "chat_sft.jsonl", "sft", rendering="auto", base=str(model),
        nemo={"recipe": "llama3_8b_sft_config"},
    )  # fmt: skip
    with pytest.raises(OperatorError, match="megatron-bridge"):
        run(ctx)
    assert ctx.sink.params["rendering"] == "chat_template"  # type: ignore[attr-defined]
    data = ctx.work_dir / "nemo" / "data" / "training.jsonl"
    first = json.loads(data.read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    run_sh = (ctx.work_dir / "nemo" / "job" / "run.sh").read_text()
    assert "dataset.dataset_kwargs={chat:true,use_hf_tokenizer_chat_template:true}" in run_sh
    overrides = yaml.safe_load((ctx.work_dir / "nemo" / "job" / "overrides.yaml").read_text())
    assert overrides["dataset.dataset_kwargs"] == {"chat": True, "use_hf_tokenizer_chat_template": True}
    assert keys.check_bridge_overrides(overrides) == []

    dpo = context(tmp_path / "dpo", "dpo", "prefs.jsonl", "preference", rendering="auto", base=str(model))
    with pytest.raises(OperatorError, match="nemo-rl"):
        run(dpo)
    config = yaml.safe_load((dpo.work_dir / "nemo" / "job" / "dpo.yaml").read_text())
    assert config["policy"]["tokenizer"]["chat_template"] == "default"
    assert keys.check_dpo_config(config) == []


def test_auto_rendering_without_the_tokenizer_here_is_a_clear_error(tmp_path: Path) -> None:
    ctx = context(tmp_path, "sft", "chat_sft.jsonl", "sft", rendering="auto")
    with pytest.raises(OperatorError) as e:
        run(ctx)
    assert "dataset 'd' has rendering: auto" in str(e.value)
    assert "meta-llama/Meta-Llama-3-8B" in str(e.value) and "set data.d.rendering" in str(e.value)


def test_stage_writes_the_job_and_stops_without_gpus(tmp_path: Path) -> None:
    ctx = context(tmp_path, "lora", "chat_sft.jsonl", "sft", parallelism={"tp": 2}, merge=False)
    with pytest.raises(OperatorError) as e:
        run(ctx)
    job_dir = ctx.work_dir / "nemo" / "job"
    assert str(e.value).startswith(
        STOP.split("{")[0] + "megatron-bridge v0.5.0 in nvcr.io/nvidia/nemo:26.06 on 2 GPU(s); "
    )
    assert "podman" in str(e.value) or "GPUs" in str(e.value)
    assert str(job_dir) in str(e.value)
    assert sorted(p.name for p in job_dir.iterdir()) == [
        "job.yaml", "overrides.yaml", "ray_job.json", "rayjob.yaml", "run.sh"
    ]  # fmt: skip
    assert (ctx.output_dir / "spec" / "rayjob.yaml").read_text() == (job_dir / "rayjob.yaml").read_text()
    rows = (ctx.work_dir / "nemo" / "data" / "training.jsonl").read_text().splitlines()
    held = (ctx.work_dir / "nemo" / "data" / "validation.jsonl").read_text().splitlines()
    assert len(rows) + len(held) == 400 and len(held) == 20  # eval_fraction 0.05
    assert set(json.loads(rows[0])) == {"input", "output"}
    assert "--hf-model meta-llama/Meta-Llama-3-8B" in (job_dir / "run.sh").read_text()
    assert ctx.sink.tags["forgeline.nemo.image"] == "nvcr.io/nvidia/nemo:26.06"  # type: ignore[attr-defined]


def test_dpo_stage_on_kubernetes_target_says_to_apply_the_rayjob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))  # no cluster configured
    ctx = context(tmp_path, "dpo", "prefs.jsonl", "preference", nemo={"shared_dir": str(tmp_path / "shared")})
    ctx.workflow = ctx.workflow.model_copy(update={"target": "kubernetes"})
    no_cluster = r"no Kubernetes cluster is configured.*kubectl apply -f rayjob\.yaml"
    with pytest.raises(OperatorError, match=no_cluster):
        run(ctx)
    first = json.loads((tmp_path / "shared" / "data" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected"}
    assert not (tmp_path / "shared" / "job" / "job.yaml").exists()  # NeMo-RL needs Ray: no plain Job


EXAMPLE = Path(__file__).resolve().parents[2] / "workflows" / "examples" / "llama3-70b-lora-tp4pp2.yaml"


def plan_of(path: Path, tmp_path: Path, text: str | None = None) -> Any:
    from forgeline.artifacts import ModelStore, StageStore
    from forgeline.plan import Planner
    from forgeline.registry import default_registry
    from forgeline.spec import load_workflow

    loaded = load_workflow(path, text)
    registry = default_registry()
    return Planner(loaded, registry, ModelStore(tmp_path, registry), StageStore(tmp_path)).build()


def test_plan_shows_trainer_image_and_where_and_blocks_bad_keys(tmp_path: Path) -> None:
    plan = plan_of(EXAMPLE, tmp_path)
    sp = plan.stage("sft")
    assert sp.problems == [] and sp.gpus == 8
    assert sp.launch == [
        "Megatron-Bridge v0.5.0 recipe llama3_70b_peft_config in nvcr.io/nvidia/nemo:26.06",
        "on KubeRay RayJob llama3-70b-lora-tp4pp2-sft in namespace training: "
        "1 node(s) x 8 GPUs (tp4 x pp2 x dp1)",
        "steps: HF -> Megatron import, torchrun run_recipe.py, export PEFT adapter",
        "rendering: raw",
    ]
    assert sp.memory is not None and 16 < sp.memory.per_device_gb < 80  # lora, tp4 x pp2, recompute
    assert sp.to_json()["launch"] == sp.launch
    text = EXAMPLE.read_text().replace(
        "launcher: rayjob", "launcher: rayjob\n      overrides: {train.train_iter: 3}"
    )
    (bad,) = plan_of(EXAMPLE, tmp_path, text).stage("sft").problems
    assert "train has no field 'train_iter'" in bad.message and bad.field == "stages[0]"
