"""Pure functions from a ``backend: nemo`` finetune stage to what NVIDIA's trainers run in their containers.

* sft / lora: Megatron-Bridge v0.5.0 (NeMo Framework 26.06 image, sources in ``/opt/Megatron-Bridge``).
  Three steps in one job script: ``examples/conversion/convert_checkpoints.py import`` (HF -> Megatron),
  ``torchrun scripts/training/run_recipe.py --recipe R --dataset llm-finetune-preloaded [--peft_scheme
  lora] KEY=VALUE...`` (ConfigContainer overrides; TP/PP on ``model.*``), then the HF export
  (``convert_checkpoints.py export`` for sft; ``examples/conversion/adapter/export_adapter.py`` for the
  PEFT adapter of lora), so downstream stages only ever see HF checkpoints.
* dpo: NeMo-RL v0.7.0 (``nvcr.io/nvidia/nemo-rl:v0.7.0``, ``/opt/nemo-rl``): a YAML whose ``defaults`` is
  the image's ``examples/configs/dpo.yaml``, with ``policy.megatron_cfg.*`` (TP/PP), ``dpo.*`` (beta as
  ``reference_policy_kl_penalty``), run by ``examples/run_dpo.py --config``; then
  ``examples/converters/convert_megatron_to_hf.py`` on the last ``step_*`` checkpoint.

Every emitted key is checked against the release's keys (:mod:`.keys`). Nothing here has run in the
containers on this machine (no GPU, no container runtime); golden files pin what is emitted.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from forgeline_operators.finetune.nemo import keys

__all__ = [
    "BRIDGE_IMAGE",
    "NEMO_RL_IMAGE",
    "JobInputs",
    "RenderError",
    "Rendered",
    "bridge_overrides",
    "default_recipe",
    "dpo_config",
    "render",
    "to_yaml",
    "train_iters",
]

# Pinned NGC tags: NeMo Framework 26.06 ships Megatron-Bridge 0.5.0 + Megatron Core 0.18 (Megatron-Bridge
# v0.6.0 docs/releases/software-versions.md); NeMo-RL publishes an image per release.
BRIDGE_IMAGE = "nvcr.io/nvidia/nemo:26.06"
NEMO_RL_IMAGE = "nvcr.io/nvidia/nemo-rl:v0.7.0"
BRIDGE_ROOT = "/opt/Megatron-Bridge"
NEMO_RL_ROOT = "/opt/nemo-rl"
MASTER_PORT = 29500

# Our HF module names -> Megatron-Bridge LoRA target names (fused QKV, fused gate/up fc1).
_LORA_TARGETS = {
    "q_proj": "linear_qkv",
    "k_proj": "linear_qkv",
    "v_proj": "linear_qkv",
    "o_proj": "linear_proj",
    "gate_proj": "linear_fc1",
    "up_proj": "linear_fc1",
    "down_proj": "linear_fc2",
}
_ALL_LINEAR = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
_MIXED = {"bf16": "bf16_mixed", "fp16": "fp16_mixed"}
_RL_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}


class RenderError(ValueError):
    """The stage cannot become a NeMo job; the message names the field and the fix."""


@dataclass(frozen=True)
class JobInputs:
    """What the renderer needs beyond the stage spec (all paths as the container sees them)."""

    name: str  # Kubernetes-safe job name
    model: str  # HF hub id, or an HF checkpoint directory on the shared filesystem
    shared_dir: str  # job root on a filesystem every node mounts at the same path
    train_rows: int
    eval_rows: int
    tracking_uri: str | None = None  # only an http(s) MLflow server is reachable from the cluster
    experiment: str = "forgeline"
    run_name: str = "finetune"
    # How rows become text, as every other stage renders them (data.resolve_rendering): "chat_template"
    # gives Megatron-Bridge `messages` rows + the HF tokenizer's template and NeMo-RL the tokenizer's
    # default template; "raw" gives input/output rows and NeMo-RL's passthrough template.
    rendering: str = "raw"


@dataclass
class Rendered:
    trainer: str  # "megatron-bridge" | "nemo-rl"
    release: str
    image: str
    nodes: int
    gpus_per_node: int
    world_size: int
    iterations: int
    files: dict[str, str]  # file name (under shared_dir/job) -> text
    entrypoint: list[str]  # argv run in the image (the job script)
    outputs: dict[str, str]  # stage output -> container path of the HF result
    config: dict[str, Any] = field(default_factory=dict)  # overrides (bridge) or the DPO YAML mapping
    recipe: str = ""  # Megatron-Bridge recipe function (sft/lora)


def default_recipe(model: str, method: str) -> str | None:
    """``meta-llama/Meta-Llama-3-70B`` + lora -> ``llama3_70b_peft_config`` when that recipe exists."""
    m = re.search(r"llama-?3(?:\.([12]))?-(\d+)b", model.lower())
    if not m:
        return None
    family = "llama3" + (m.group(1) or "")
    name = f"{family}_{m.group(2)}b_{'peft' if method == 'lora' else 'sft'}_config"
    return name if name in keys.bridge_recipes() else None


def train_iters(stage: Any, rows: int) -> int:
    t, par = stage.training, stage.parallelism
    global_batch = t.micro_batch_size * t.grad_accum * par.dp
    iters = max(1, math.ceil(rows * t.epochs / global_batch))
    return min(iters, t.max_steps) if t.max_steps else iters


def _layout(stage: Any) -> tuple[int, int, int]:
    nemo = stage.nemo
    gpn = nemo.gpus_per_node if nemo else 8
    world = stage.parallelism.world_size
    if world > gpn and world % gpn:
        raise RenderError(
            f"parallelism tp*pp*dp = {world} is not a whole number of {gpn}-GPU nodes; "
            "change parallelism or nemo.gpus_per_node"
        )
    nodes = max(1, world // gpn) if world > gpn else 1
    return nodes, min(world, gpn), world


def _lora_targets(targets: list[str] | str) -> list[str]:
    if targets == "all-linear":
        return list(_ALL_LINEAR)
    unknown = [t for t in targets if t not in _LORA_TARGETS]
    if unknown:
        raise RenderError(f"lora.target_modules {unknown}: backend nemo knows {sorted(_LORA_TARGETS)}")
    return sorted({_LORA_TARGETS[t] for t in targets}, key=_ALL_LINEAR.index)


def _precision(stage: Any) -> str:
    p = stage.training.precision
    if p not in _MIXED:
        raise RenderError(
            f"training.precision {p!r}: the NeMo trainers run mixed precision on GPUs; set bf16 (or fp16)"
        )
    return p


def bridge_overrides(stage: Any, job: JobInputs, iters: int) -> dict[str, Any]:
    """ConfigContainer ``section.field`` overrides, in the order they are passed (user overrides last)."""
    t, par = stage.training, stage.parallelism
    w = f"{job.shared_dir}/work"
    o: dict[str, Any] = {
        "model.tensor_model_parallel_size": par.tp,
        "model.pipeline_model_parallel_size": par.pp,
        "model.seq_length": t.max_seq_len,
        "mixed_precision": _MIXED[_precision(stage)],
        "train.train_iters": iters,
        "train.global_batch_size": t.micro_batch_size * t.grad_accum * par.dp,
        "train.micro_batch_size": t.micro_batch_size,
        "optimizer.lr": t.lr,
        "optimizer.min_lr": t.lr if t.lr_scheduler == "constant" else 0.0,
        "optimizer.weight_decay": t.weight_decay,
        "scheduler.lr_decay_style": t.lr_scheduler,
        "scheduler.lr_warmup_iters": int(t.warmup_ratio * iters),
        "scheduler.lr_decay_iters": iters,
        "rng.seed": t.seed,
        "dataset.dataset_root": f"{job.shared_dir}/data",
        "dataset.seq_length": t.max_seq_len,
        "dataset.do_validation": job.eval_rows > 0,
        "dataset.do_test": False,
        "checkpoint.pretrained_checkpoint": f"{w}/megatron_base",
        "checkpoint.save": f"{w}/checkpoints",
        "checkpoint.save_interval": t.checkpoint_every_steps or iters,
        "checkpoint.load": f"{w}/checkpoints",  # resume after a pod restart
    }
    if job.rendering == "chat_template":
        # GPTSFTChatDataset over `messages` rows, rendered by the HF tokenizer's own chat template
        # (Megatron-Bridge v0.5.0 create_sft_dataset; loss on the assistant turns only).
        o["dataset.dataset_kwargs"] = {"chat": True, "use_hf_tokenizer_chat_template": True}
    if t.gradient_checkpointing:
        o |= {
            "model.recompute_granularity": "full",
            "model.recompute_method": "uniform",
            "model.recompute_num_layers": 1,
        }
    if stage.method == "lora":
        lora = stage.lora
        o |= {
            "peft.dim": lora.r if lora else 8,
            "peft.alpha": lora.alpha if lora else 16,
            "peft.dropout": lora.dropout if lora else 0.05,
            "peft.target_modules": _lora_targets(lora.target_modules if lora else "all-linear"),
        }
    if job.tracking_uri and job.tracking_uri.startswith(("http://", "https://")):
        o |= {
            "logger.mlflow_tracking_uri": job.tracking_uri,
            "logger.mlflow_experiment": job.experiment,
            "logger.mlflow_run_name": job.run_name,
        }
    o |= dict(stage.nemo.overrides) if stage.nemo else {}
    problems = keys.check_bridge_overrides(o)
    if problems:
        raise RenderError("; ".join(problems))
    return o


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):  # Hydra's dictionary override syntax
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return "null"
    return str(v)


def _bridge(stage: Any, job: JobInputs) -> Rendered:
    nodes, gpn, world = _layout(stage)
    recipe = (stage.nemo.recipe if stage.nemo else None) or default_recipe(job.model, stage.method)
    if recipe is None:
        raise RenderError(
            f"no Megatron-Bridge {keys.BRIDGE_RELEASE} recipe known for model {job.model!r}; "
            "set nemo.recipe (e.g. llama3_8b_peft_config)"
        )
    if recipe not in keys.bridge_recipes():
        raise RenderError(f"nemo.recipe {recipe!r} is not a Megatron-Bridge {keys.BRIDGE_RELEASE} recipe")
    if stage.method == "lora" and stage.merge is not False:
        # Megatron-Bridge's export_adapter.py writes the PEFT adapter; a merged export is not wired.
        raise RenderError("method lora on backend nemo publishes the PEFT adapter only: set merge: false")
    iters = train_iters(stage, job.train_rows)
    overrides = bridge_overrides(stage, job, iters)
    w, out = f"{job.shared_dir}/work", f"{job.shared_dir}/out"
    convert = f"{BRIDGE_ROOT}/examples/conversion/convert_checkpoints.py"
    imp = ["python", convert, "import", "--hf-model", job.model, "--megatron-path", f"{w}/megatron_base"]
    imp += ["--torch-dtype", "bfloat16" if _precision(stage) == "bf16" else "float16"]
    train = ["torchrun", f"--nnodes={nodes}", "--node_rank=${NODE_RANK}", f"--nproc_per_node={gpn}"]
    train += ["--master_addr=${MASTER_ADDR}", f"--master_port={MASTER_PORT}"]
    train += [f"{BRIDGE_ROOT}/scripts/training/run_recipe.py", "--recipe", recipe]
    train += ["--dataset", "llm-finetune-preloaded", "--seq_length", str(stage.training.max_seq_len)]
    if stage.method == "lora":
        train += ["--peft_scheme", "lora"]
    train += [f"{k}={_value(v)}" for k, v in overrides.items()]
    if stage.method == "lora":
        export = ["python", f"{BRIDGE_ROOT}/examples/conversion/adapter/export_adapter.py"]
        export += [
            "--hf-model-path",
            job.model,
            "--lora-checkpoint",
            f"{w}/checkpoints",
            "--output",
            f"{out}/adapter",
        ]
        outputs = {"adapter": f"{out}/adapter"}
    else:
        export = ["python", convert, "export", "--hf-model", job.model, "--megatron-path", f"{w}/checkpoints"]
        export += ["--hf-path", f"{out}/merged"]
        outputs = {"merged": f"{out}/merged"}
    script = _script(job, nodes, first=[imp], train=train, last=[export])
    files = {"run.sh": script, "overrides.yaml": to_yaml(overrides)}
    return Rendered(
        "megatron-bridge", keys.BRIDGE_RELEASE, _image(stage, BRIDGE_IMAGE), nodes, gpn, world, iters, files,
        ["bash", f"{job.shared_dir}/job/run.sh"], outputs, overrides, recipe,
    )  # fmt: skip


def dpo_config(stage: Any, job: JobInputs, iters: int, nodes: int, gpn: int) -> dict[str, Any]:
    """The NeMo-RL DPO YAML mapping (Megatron policy; keys checked against NeMo-RL's dpo.yaml)."""
    t, par = stage.training, stage.parallelism
    dpo = stage.dpo
    if dpo is not None and dpo.loss != "sigmoid":
        raise RenderError(
            f"dpo.loss {dpo.loss!r}: NeMo-RL {keys.NEMO_RL_RELEASE} DPO has the sigmoid loss only"
        )
    if dpo is not None and dpo.reference is not None:
        raise RenderError("dpo.reference: NeMo-RL uses the starting policy as the reference; drop it")
    if stage.lora is not None:
        raise RenderError(
            "method dpo with lora on backend nemo: NeMo-RL's LoRA export needs the base Megatron checkpoint "
            "it converts internally (not wired yet); drop lora (full DPO) or use backend hf/megatron"
        )
    w, data = f"{job.shared_dir}/work", f"{job.shared_dir}/data"
    pref = {"dataset_name": "BinaryPreferenceDataset", "prompt_key": "prompt"}
    pref |= {"chosen_key": "chosen", "rejected_key": "rejected"}
    config: dict[str, Any] = {
        "defaults": f"{NEMO_RL_ROOT}/examples/configs/dpo.yaml",
        "dpo": {
            "max_num_epochs": max(1, math.ceil(t.epochs)),
            "max_num_steps": iters,
            "seed": t.seed,
            "reference_policy_kl_penalty": dpo.beta if dpo else 0.1,
            "val_at_start": False,
            "val_period": t.checkpoint_every_steps or iters,
        },
        "checkpointing": {
            "enabled": True,
            "checkpoint_dir": f"{w}/checkpoints",
            "save_period": t.checkpoint_every_steps or iters,
        },
        "policy": {
            "model_name": job.model,
            # "default": the tokenizer's own chat template; None: NeMo-RL's passthrough (raw text).
            "tokenizer": {
                "name": job.model,
                "chat_template": "default" if job.rendering == "chat_template" else None,
            },
            "train_global_batch_size": t.micro_batch_size * t.grad_accum * par.dp,
            "train_micro_batch_size": t.micro_batch_size,
            "max_total_sequence_length": t.max_seq_len,
            "precision": _RL_PRECISION[_precision(stage)],
            "dtensor_cfg": {"enabled": False},
            "make_sequence_length_divisible_by": par.tp,
            "optimizer": None,  # the dtensor optimizer; megatron_cfg.optimizer is used instead
            "megatron_cfg": {
                "enabled": True,
                "tensor_model_parallel_size": par.tp,
                "pipeline_model_parallel_size": par.pp,
                "activation_checkpointing": t.gradient_checkpointing,
                "optimizer": {
                    "lr": t.lr,
                    "min_lr": t.lr if t.lr_scheduler == "constant" else 0.0,
                    "weight_decay": t.weight_decay,
                },
                "scheduler": {
                    "lr_decay_style": t.lr_scheduler,
                    "lr_warmup_iters": max(1, int(t.warmup_ratio * iters)),
                },
            },
        },
        "data": {
            "max_input_seq_length": t.max_seq_len,
            "train": pref | {"data_path": f"{data}/train.jsonl"},
            "validation": pref | {"data_path": f"{data}/validation.jsonl"},
        },
        "logger": {
            "log_dir": f"{w}/logs",
            "wandb_enabled": False,
            "tensorboard_enabled": False,
            "mlflow_enabled": False,
        },
        "cluster": {"gpus_per_node": gpn, "num_nodes": nodes},
    }
    if job.eval_rows == 0:
        config["data"].pop("validation")
        config["dpo"]["val_period"] = 0
    if job.tracking_uri and job.tracking_uri.startswith(("http://", "https://")):
        config["logger"]["mlflow_enabled"] = True
        config["logger"]["mlflow"] = {
            "experiment_name": job.experiment,
            "run_name": job.run_name,
            "tracking_uri": job.tracking_uri,
        }
    user = dict(stage.nemo.overrides) if stage.nemo else {}
    for dotted, value in user.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RenderError(f"nemo.overrides {dotted}: {p} is not a mapping in the DPO config")
        node[leaf] = value
    problems = keys.check_dpo_config(config)
    if problems:
        raise RenderError("; ".join(problems))
    return config


def _dpo(stage: Any, job: JobInputs) -> Rendered:
    nodes, gpn, world = _layout(stage)
    iters = train_iters(stage, job.train_rows)
    config = dpo_config(stage, job, iters, nodes, gpn)
    w, out = f"{job.shared_dir}/work", f"{job.shared_dir}/out"
    train = ["uv", "run", "python", "examples/run_dpo.py", "--config", f"{job.shared_dir}/job/dpo.yaml"]
    step = f"{w}/checkpoints/$(ls {w}/checkpoints | grep '^step_' | sort -t_ -k2 -n | tail -1)"
    export = ["uv", "run", "--extra", "mcore", "python", "examples/converters/convert_megatron_to_hf.py"]
    export += [
        "--config",
        f"{step}/config.yaml",
        "--megatron-ckpt-path",
        f"{step}/policy/weights/iter_0000000",
    ]
    export += ["--hf-ckpt-path", f"{out}/merged"]
    # NeMo-RL starts its own Ray workers on every node of the cluster: one driver, no torchrun.
    script = _script(job, 1, first=[], train=train, last=[export], cwd=NEMO_RL_ROOT)
    files = {"run.sh": script, "dpo.yaml": to_yaml(config)}
    return Rendered(
        "nemo-rl", keys.NEMO_RL_RELEASE, _image(stage, NEMO_RL_IMAGE), nodes, gpn, world, iters, files,
        ["bash", f"{job.shared_dir}/job/run.sh"], {"merged": f"{out}/merged"}, config,
    )  # fmt: skip


def _image(stage: Any, default: str) -> str:
    return (stage.nemo.image if stage.nemo else None) or default


def _cmd(argv: list[str]) -> str:
    # "${NODE_RANK}", "$(ls ...)" are expanded by the job's shell (double quotes); the rest is literal.
    return " ".join(f'"{a}"' if ("${" in a or "$(" in a) else shlex.quote(a) for a in argv)


def _script(
    job: JobInputs, nodes: int, first: list[list[str]], train: list[str], last: list[list[str]], cwd: str = ""
) -> str:
    lines = [
        "#!/bin/bash",
        f"# Rendered by Forgeline for {job.name}; runs in the trainer image on every node of the job.",
        "set -euo pipefail",
        'NODE_RANK="${JOB_COMPLETION_INDEX:-${NODE_RANK:-0}}"',
        f'MASTER_ADDR="${{MASTER_ADDR:-127.0.0.1}}"  # nodes={nodes}: the Job sets it to pod 0',
        "export NODE_RANK MASTER_ADDR",
    ]
    if cwd:
        lines.append(f"cd {shlex.quote(cwd)}")
    marker = f"{job.shared_dir}/work/.imported"
    if first:
        lines.append('if [ "$NODE_RANK" = 0 ]; then')
        lines += [f"  {_cmd(c)}" for c in first]
        lines.append(f"  touch {shlex.quote(marker)}")
        # Other nodes wait for the import on the shared filesystem before joining the rendezvous.
        lines.append(f"else\n  until [ -f {shlex.quote(marker)} ]; do sleep 10; done\nfi")
    lines.append(_cmd(train))
    if last:
        lines.append('if [ "$NODE_RANK" = 0 ]; then')
        lines += [f"  {_cmd(c)}" for c in last]
        lines.append("fi")
    return "\n".join(lines) + "\n"


def to_yaml(mapping: dict[str, Any]) -> str:
    """Block YAML in the given key order (stable golden files and diffs)."""
    return str(yaml.safe_dump(mapping, sort_keys=False, default_flow_style=False, width=1000))


def render(stage: Any, job: JobInputs) -> Rendered:
    """The trainer job for a nemo stage (raises :class:`RenderError` with the fix when it cannot be one)."""
    if stage.method in ("sft", "lora"):
        return _bridge(stage, job)
    if stage.method == "dpo":
        return _dpo(stage, job)
    raise RenderError(f"method {stage.method!r}: backend nemo runs sft, lora and dpo")
