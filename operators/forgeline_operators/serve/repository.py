"""Triton model repository for the CPU runtime: a decoupled python model over OpenVINO GenAI.

Pure functions: :func:`openvino_config` renders ``config.pbtxt`` from the typed scheduler settings
(golden-tested); :func:`build_openvino_repository` lays out ``<name>/config.pbtxt``,
``<name>/1/model.py`` (:mod:`.triton_model`, copied verbatim) and ``<name>/1/engine/`` (the OpenVINO
IR with its tokenizer), plus ``forgeline-repository.json`` describing what was built.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from forgeline.spec._models import SchedulerSpec

__all__ = [
    "INPUTS",
    "MANIFEST",
    "OUTPUTS",
    "AdapterRef",
    "OpenvinoModelSpec",
    "build_openvino_repository",
    "is_openvino_ir",
    "openvino_config",
]

MANIFEST = "forgeline-repository.json"
MODEL_PY = Path(__file__).with_name("triton_model.py")

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
class OpenvinoModelSpec:
    """What the CPU model needs beyond the IR: batching limits, precision, threads, adapters."""

    name: str
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    threads: int = 1
    precision: str = "f32"  # INFERENCE_PRECISION_HINT and KV_CACHE_PRECISION; f32 is bit-exact vs HF
    num_kv_blocks: int = 512  # used when scheduler.kv_cache_gb is unset (block = 32 tokens)
    adapters: Mapping[str, AdapterRef] = field(default_factory=dict)
    # Streaming responses per second, all live requests together: each one is an IPC round trip plus
    # an SSE event in Triton, the front and the client, so under load several tokens share one.
    max_stream_events_per_s: float = 500.0


def is_openvino_ir(path: Path) -> bool:
    return (path / "openvino_model.xml").exists() and (path / "openvino_tokenizer.xml").exists()


def _io(kind: str, items: tuple[tuple[str, str, str], ...], optional: bool) -> str:
    rows = []
    for name, dtype, dims in items:
        extra = " optional: true" if optional else ""
        rows.append(f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{extra} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _params(values: Mapping[str, str]) -> str:
    return "".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}\n' for k, v in values.items()
    )


def openvino_config(spec: OpenvinoModelSpec) -> str:
    """``config.pbtxt`` of the decoupled python model (no I/O: pure)."""
    s = spec.scheduler
    params = {
        "engine_dir": "engine",
        "max_num_seqs": str(s.max_num_seqs),
        "max_num_batched_tokens": str(s.max_batched_tokens),
        "enable_prefix_caching": "true" if s.prefix_caching else "false",
        "kv_cache_gb": str(s.kv_cache_gb or 0),
        "num_kv_blocks": str(spec.num_kv_blocks),
        "num_threads": str(spec.threads),
        "inference_precision": spec.precision,
        "kv_cache_precision": spec.precision,
        "max_stream_events_per_s": f"{spec.max_stream_events_per_s:g}",
        "adapters": json.dumps(
            {
                n: {"path": f"adapters/{n}/adapter_model.safetensors", "alpha": a.alpha}
                for n, a in sorted(spec.adapters.items())
            },
            sort_keys=True,
        ),
    }
    return (
        f'name: "{spec.name}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
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


def build_openvino_repository(dest: Path, engine_dir: Path, spec: OpenvinoModelSpec) -> Path:
    """Write a model repository serving ``engine_dir`` (an OpenVINO IR + tokenizer) under ``dest``."""
    if not is_openvino_ir(engine_dir):
        raise ValueError(f"{engine_dir} is not an OpenVINO IR with its tokenizer (openvino_*.xml)")
    version = dest / spec.name / "1"
    version.mkdir(parents=True, exist_ok=False)
    (dest / spec.name / "config.pbtxt").write_text(openvino_config(spec))
    shutil.copyfile(MODEL_PY, version / "model.py")
    _copy_tree(engine_dir, version / "engine")
    for name, adapter in sorted(spec.adapters.items()):
        target = version / "adapters" / name
        target.mkdir(parents=True)
        shutil.copyfile(adapter.path / "adapter_model.safetensors", target / "adapter_model.safetensors")
    manifest = {
        "runtime": "triton",
        "engine": "openvino",
        "models": [spec.name],
        "served_model": spec.name,
        "adapters": sorted(spec.adapters),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dest
