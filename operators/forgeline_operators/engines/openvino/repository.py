"""Triton model repository of the OpenVINO engine: a decoupled python model over OpenVINO GenAI.

Pure functions: :func:`openvino_config` renders ``config.pbtxt`` from the typed scheduler settings
(golden-tested); :func:`build_openvino_repository` lays out ``<name>/config.pbtxt``,
``<name>/1/model.py`` (:mod:`.triton_model`, copied verbatim) and ``<name>/1/engine/`` (the OpenVINO
IR with its tokenizer), plus ``forgeline-repository.json`` describing what was built.

With LoRA adapters, ``<name>`` is the router of :mod:`.lora_router` and the engines are
``<name>__base`` and one ``<name>__<adapter>`` per adapter (OpenVINO GenAI's step API cannot switch
adapters per request, see that module); the engines share the IR through hard links. A draft model
for speculative decoding is copied to ``<engine>/1/draft/``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from forgeline_operators.engines import MANIFEST, SchedulerSpec
from forgeline_operators.engines.openvino.ir import is_ir

__all__ = [
    "BASE_SUFFIX",
    "INPUTS",
    "MANIFEST",
    "OUTPUTS",
    "AdapterRef",
    "OpenvinoModelSpec",
    "SpeculativeRef",
    "adapter_ref",
    "build_openvino_repository",
    "openvino_config",
    "router_config",
]

MODEL_PY = Path(__file__).with_name("triton_model.py")
ROUTER_PY = Path(__file__).with_name("lora_router.py")
BASE_SUFFIX = "__base"

# (name, Triton type, dims); every input is optional.
INPUTS: tuple[tuple[str, str, str], ...] = (
    ("text_input", "TYPE_STRING", "[ 1 ]"),
    ("messages", "TYPE_STRING", "[ 1 ]"),
    ("max_tokens", "TYPE_INT32", "[ 1 ]"),
    ("temperature", "TYPE_FP32", "[ 1 ]"),
    ("top_p", "TYPE_FP32", "[ 1 ]"),
    ("top_k", "TYPE_INT32", "[ 1 ]"),
    ("seed", "TYPE_INT64", "[ 1 ]"),
    ("stop", "TYPE_STRING", "[ -1 ]"),
    ("ignore_eos", "TYPE_BOOL", "[ 1 ]"),
    ("stream", "TYPE_BOOL", "[ 1 ]"),
    ("lora_name", "TYPE_STRING", "[ 1 ]"),
)
OUTPUTS: tuple[tuple[str, str, str], ...] = (
    ("text_output", "TYPE_STRING", "[ 1 ]"),
    ("output_ids", "TYPE_INT32", "[ -1 ]"),
    ("finish_reason", "TYPE_STRING", "[ 1 ]"),
    ("prompt_tokens", "TYPE_INT32", "[ 1 ]"),
    ("completion_tokens", "TYPE_INT32", "[ 1 ]"),
)


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter served by name: ``adapter_model.safetensors`` dir and its ``lora_alpha / r``."""

    path: Path
    alpha: float


@dataclass(frozen=True)
class SpeculativeRef:
    """A draft model (OpenVINO IR) and how many tokens it proposes per step."""

    path: Path
    num_assistant_tokens: int = 5


def adapter_ref(adapter_dir: Path) -> AdapterRef:
    """A PEFT LoRA directory as served: its weights and the scale PEFT applies (``lora_alpha / r``).

    OpenVINO GenAI reads only the safetensors, never ``adapter_config.json``: the scale must be passed
    explicitly (alpha 1.0 silently gives near-base output).
    """
    config_path = adapter_dir / "adapter_config.json"
    if not (adapter_dir / "adapter_model.safetensors").is_file() or not config_path.is_file():
        raise ValueError(
            f"{adapter_dir} is not a PEFT LoRA adapter (needs adapter_config.json and "
            "adapter_model.safetensors); reference a finetune stage's `adapter` output"
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir} is a {config['peft_type']} adapter; only LoRA is served")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(
            f"{adapter_dir} uses per-module rank_pattern/alpha_pattern; the runtime applies one scale "
            "per adapter: merge it (finetune `merge: true`) and serve the merged model instead"
        )
    r, lora_alpha = int(config["r"]), float(config["lora_alpha"])
    scale = lora_alpha / r**0.5 if config.get("use_rslora") else lora_alpha / r
    return AdapterRef(adapter_dir, alpha=scale)


@dataclass(frozen=True)
class OpenvinoModelSpec:
    """What the CPU model needs beyond the IR: batching limits, precision, threads, adapters."""

    name: str
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    threads: int = 1
    num_kv_blocks: int = 512  # used when scheduler.kv_cache_gb is unset (block = 32 tokens)
    adapters: Mapping[str, AdapterRef] = field(default_factory=dict)
    speculative: SpeculativeRef | None = None
    # Streaming responses per second, all live requests together: each one is an IPC round trip plus
    # an SSE event in Triton, the front and the client, so under load several tokens share one.
    max_stream_events_per_s: float = 500.0


def _io(kind: str, items: tuple[tuple[str, str, str], ...], optional: bool) -> str:
    rows = []
    for name, dtype, dims in items:
        # Inputs: optional, and ragged so that requests of any shapes (a stop list or none) share a batch.
        extra = " optional: true allow_ragged_batch: true" if optional else ""
        rows.append(f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{extra} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _params(values: Mapping[str, str]) -> str:
    return "".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}\n' for k, v in values.items()
    )


def openvino_config(spec: OpenvinoModelSpec) -> str:
    """``config.pbtxt`` of the decoupled python model (no I/O: pure)."""
    s = spec.scheduler
    if s.inference_precision == "bf16" and spec.threads < 2:
        # Seen with OpenVINO 2026.4 on this AMX CPU: SIGFPE inside the CPU plugin compiling the model at
        # INFERENCE_NUM_THREADS 1 under bf16 (plain compile_model too, any KV cache precision, with
        # or without CPU pinning or a performance hint; 2+ threads, and f32 or f16 on one, are fine).
        # Upstream: openvinotoolkit/openvino#33300 (SIGFPE under `taskset -c 0`, open).
        raise ValueError(
            f"inference_precision 'bf16' needs 2 or more engine threads, got {spec.threads} "
            "(OpenVINO 2026.4 crashes building a one-thread bf16 pipeline); give the stage "
            "`resources: {cpus: 2}` (forgeline serve: --threads 2) or use inference_precision 'f32'"
        )
    params = {
        "engine_dir": "engine",
        "max_num_seqs": str(s.max_num_seqs),
        "max_num_batched_tokens": str(s.max_batched_tokens),
        "enable_prefix_caching": "true" if s.prefix_caching else "false",
        "kv_cache_gb": str(s.kv_cache_gb or 0),
        "num_kv_blocks": str(spec.num_kv_blocks),
        "num_threads": str(spec.threads),
        "inference_precision": s.inference_precision,
        # The scheduler's choice (f32 bit-exact vs transformers, or u8) at f32 inference; the CPU plugin
        # refuses any cache but bf16 under bf16 inference (seen with OpenVINO 2026.4).
        "kv_cache_precision": s.engine_kv_cache_precision,
        "max_stream_events_per_s": f"{spec.max_stream_events_per_s:g}",
        **(
            {"draft_model": "draft", "num_assistant_tokens": str(spec.speculative.num_assistant_tokens)}
            if spec.speculative
            else {}
        ),
        "adapters": json.dumps(
            {
                n: {"path": f"adapters/{n}/adapter_model.safetensors", "alpha": a.alpha}
                for n, a in sorted(spec.adapters.items())
            },
            sort_keys=True,
        ),
    }
    return _decoupled_python(spec.name, params, s.max_num_seqs)


def router_config(name: str, routes: Mapping[str, str], max_batch: int) -> str:
    """``config.pbtxt`` of the LoRA router: the engine's I/O, ``routes`` = adapter ("" = base) → model."""
    routes_json = json.dumps(dict(sorted(routes.items())), sort_keys=True)
    return _decoupled_python(name, {"routes": routes_json}, max_batch)


def _decoupled_python(name: str, params: Mapping[str, str], max_batch: int) -> str:
    """A decoupled python-backend model on one CPU instance with the engine's inputs and outputs.

    Dynamic batching hands the model every request that queued while it was busy in one ``execute``.
    The engine model needs it: OpenVINO GenAI's ``step()`` holds the GIL for the whole step (2026.4;
    measured), so ``execute`` runs only between steps, and with one request per ``execute`` (Triton's
    default without a batcher) 64 simultaneous requests took ~4 s, one to four per step, to enter
    the engine (bench/serving.py, ~30M model: endpoint overhead 1.33-1.45x the in-process engine;
    with the batcher, the admission lock and the grace in triton_model.py, the 64 enter in one to
    five ``execute`` calls within ~0.3 s, ~0.7 s at worst). Each request of a batch keeps its
    own tensors (shape ``[1, ...]``) and its own response sender; no queue delay is added.
    """
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {max_batch}\n"
        "dynamic_batching { }\n"
        "model_transaction_policy { decoupled: true }\n"
        + _io("input", INPUTS, optional=True)
        + _io("output", OUTPUTS, optional=False)
        + "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        + _params(params)
    )


def _copy_tree(src: Path, dst: Path) -> None:
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)  # large IR files: no second copy when on the same filesystem
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def _engine_model(dest: Path, engine_dir: Path, spec: OpenvinoModelSpec) -> None:
    version = dest / spec.name / "1"
    version.mkdir(parents=True, exist_ok=False)
    (dest / spec.name / "config.pbtxt").write_text(openvino_config(spec))
    shutil.copyfile(MODEL_PY, version / "model.py")
    _copy_tree(engine_dir, version / "engine")
    if spec.speculative is not None:
        _copy_tree(spec.speculative.path, version / "draft")
    for name, adapter in sorted(spec.adapters.items()):
        target = version / "adapters" / name
        target.mkdir(parents=True)
        shutil.copyfile(adapter.path / "adapter_model.safetensors", target / "adapter_model.safetensors")


def build_openvino_repository(dest: Path, engine_dir: Path, spec: OpenvinoModelSpec) -> Path:
    """Write a model repository serving ``engine_dir`` (an OpenVINO IR + tokenizer) under ``dest``."""
    if not is_ir(engine_dir):
        raise ValueError(f"{engine_dir} is not an OpenVINO IR with its tokenizer (openvino_*.xml)")
    if spec.speculative is not None and not is_ir(spec.speculative.path):
        raise ValueError(f"draft model {spec.speculative.path} is not an OpenVINO IR with its tokenizer")
    routes: dict[str, str] = {}
    if not spec.adapters:
        _engine_model(dest, engine_dir, spec)
        models = [spec.name]
    else:
        routes[""] = spec.name + BASE_SUFFIX
        _engine_model(dest, engine_dir, replace(spec, name=routes[""], adapters={}))
        for name, adapter in sorted(spec.adapters.items()):
            routes[name] = f"{spec.name}__{name}"
            _engine_model(dest, engine_dir, replace(spec, name=routes[name], adapters={name: adapter}))
        router = dest / spec.name
        (router / "1").mkdir(parents=True)
        (router / "config.pbtxt").write_text(router_config(spec.name, routes, spec.scheduler.max_num_seqs))
        shutil.copyfile(ROUTER_PY, router / "1" / "model.py")
        models = [spec.name, *sorted(routes.values())]
    manifest = {
        "runtime": "triton",
        "engine": "openvino",
        "models": models,
        "served_model": spec.name,
        "adapters": sorted(spec.adapters),
        "routes": routes,  # adapter ("" = base) → engine model, for a front that skips the router
        "speculative": (
            {"num_assistant_tokens": spec.speculative.num_assistant_tokens} if spec.speculative else None
        ),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dest
