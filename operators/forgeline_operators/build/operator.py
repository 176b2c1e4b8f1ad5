"""``run_openvino`` / ``run_tensorrt_llm``: the build stage, one entrypoint per engine (backend).

openvino (runs here): an HF checkpoint is exported to OpenVINO IR in ``openvino.weight_format``
(default fp32); an IR from an ``nncf_*`` quantize stage is taken as it is (its weight format is the
quantize stage's). Either way the result is smoke-loaded in OpenVINO GenAI before it is published.

tensorrt-llm: the stage renders and validates both build forms into ``artifact`` (``trtllm-build.sh``
for a TRT-LLM checkpoint, ``extra_llm_api_options.yaml`` for the PyTorch backend, ``build_spec.json``)
and, where ``tensorrt_llm`` imports and a GPU is present, builds the engine with ``trtllm-build``.
Elsewhere it fails with :data:`CPU_STOP` after printing the rendered spec (the stage log keeps it;
the runtime discards a failed stage's outputs). With the workflow's ``target: kubernetes`` the stage
applies an ``EngineBuild`` and waits on its status instead (:mod:`.kube_target`). Built engines are
cached by content key (:func:`trtllm.engine_key`: checkpoint digest + build settings + TensorRT-LLM
version + GPU SM) under ``$FORGELINE_ENGINE_CACHE`` or ``<home>/engine-cache/<key>``, shared by every
workflow on the node; a hit copies the engine instead of building. The engine build and the cache hit
path need a GPU and are untested here; the key, the cache store and lookup are unit-tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from forgeline.artifacts import dir_digest, read_manifest
from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline_operators.engines.openvino import ir as ov
from forgeline_operators.engines.tensorrt_llm import trtllm
from forgeline_operators.engines.tensorrt_llm.settings import TrtllmBuildSpec

__all__ = [
    "CPU_STOP",
    "ENGINE_CACHE_ENV",
    "cached_engine",
    "checkpoint_digest",
    "engine_cache_root",
    "run_openvino",
    "run_tensorrt_llm",
    "store_engine",
]

ENGINE_CACHE_ENV = "FORGELINE_ENGINE_CACHE"
_ENGINE_META = "forgeline_engine_key.json"  # written last: its presence marks a complete cache entry

CPU_STOP = (
    "engine: tensorrt-llm needs a CUDA GPU with the `tensorrt_llm` package importable "
    "(TensorRT-LLM {version}.x for the trtllm-build engine; any recent release for the LLM-API profile); "
    "this machine has {found}. The build spec was written and validated (see the stage log): run this "
    "stage on a GPU node (resources.device: gpu) or serve the checkpoint with trtllm-serve "
    "--extra_llm_api_options."
)


def run_openvino(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    src = ctx.input_path(stage.from_)
    wanted = stage.openvino.weight_format if stage.openvino else None
    out = ctx.output_dir / "artifact"
    if ov.is_ir(src):
        have = ov.ir_weight_format(src)
        if wanted is not None and have is not None and wanted != have:
            raise OperatorError(
                f"openvino.weight_format={wanted!r} but the input IR is already {have!r} (set by its "
                "quantize stage); drop openvino.weight_format or build from the HF checkpoint"
            )
        shutil.copytree(src, out)
        weight_format = have or "unknown"
    elif (src / "hf_quant_config.json").is_file():
        raise OperatorError(
            "the input is a ModelOpt checkpoint (hf_quant_config.json), which targets TensorRT-LLM; for "
            "the OpenVINO runtime quantize with format nncf_int8/nncf_int4 or build from the HF checkpoint"
        )
    elif (src / "config.json").is_file():
        weight_format = wanted or "fp32"
        ov.export_ir(src, out, weight_format, ctx.work_dir)
    else:
        raise OperatorError(f"{stage.from_}: neither an HF checkpoint nor an OpenVINO IR ({src})")
    ov.smoke_load(out)
    size = sum(p.stat().st_size for p in out.glob("openvino_model.bin"))
    metrics = {"artifact_bytes": float(size)}
    ctx.log_metrics(metrics)
    ctx.set_tags({"forgeline.build.engine": "openvino", "forgeline.build.weight_format": weight_format})
    return StageResult(outputs={"artifact": out}, metrics=metrics)


def _checkpoint_kind(src: Path) -> tuple[str, dict[str, Any]]:
    config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
    if config is None:
        raise OperatorError(f"{src} has no config.json: not an HF or TRT-LLM checkpoint")
    if "architecture" in config and "mapping" in config:
        return "trtllm", config
    return "hf", config


def write_spec(stage: Any, src: Path, out: Path) -> dict[str, Any]:
    """Render and validate both build forms into ``out``; returns the spec (pure but for the files)."""
    spec = stage.tensorrt_llm or TrtllmBuildSpec()
    kind, config = _checkpoint_kind(src)
    quant = (config.get("quantization") or {}) if kind == "trtllm" else _hf_quant(src)
    out.mkdir(parents=True, exist_ok=True)
    try:
        options = trtllm.llm_api_options(spec, quant.get("kv_cache_quant_algo"))
        argv = trtllm.trtllm_build_command(spec, str(src), str(out / "engine")) if kind == "trtllm" else None
    except ValueError as e:
        raise OperatorError(str(e)) from e
    if kind == "trtllm":
        mapping = config["mapping"]
        if (mapping.get("tp_size", 1), mapping.get("pp_size", 1)) != (spec.tp, spec.pp):
            raise OperatorError(
                f"tensorrt_llm tp={spec.tp}, pp={spec.pp} but the TRT-LLM checkpoint is sharded "
                f"tp={mapping.get('tp_size', 1)}, pp={mapping.get('pp_size', 1)} (set quantize export_trtllm)"
            )
        ranks = sorted(p.name for p in src.glob("rank*.safetensors"))
        if len(ranks) != spec.tp * spec.pp:
            raise OperatorError(f"expected {spec.tp * spec.pp} rank files in {src}, found {ranks}")
    try:
        key = trtllm.engine_key(
            checkpoint_digest(src),
            spec,
            installed_version=trtllm.detected_version(),
            gpu_arch=trtllm.detected_gpu_arch(),
        )
    except ValueError as e:
        raise OperatorError(str(e)) from e
    (out / "extra_llm_api_options.yaml").write_text(trtllm.render_yaml(options))
    if argv is not None:
        (out / "trtllm-build.sh").write_text("#!/bin/sh\nexec " + trtllm.shell(argv))
    summary = {
        "checkpoint": str(src),
        "checkpoint_kind": kind,
        "quantization": quant,
        "tensorrt_llm_version": trtllm.TRTLLM_VERSION,
        "trtllm_build": argv,
        "extra_llm_api_options": options,
        "settings": spec.model_dump(),
        "engine_cache": {"key": key.key, "components": key.components, "sources": key.sources},
    }
    (out / "build_spec.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def checkpoint_digest(src: Path) -> str:
    """The content digest of a checkpoint directory: its manifest's when published, else computed."""
    manifest = read_manifest(src)
    return manifest.digest if manifest is not None and manifest.digest else dir_digest(src)


def engine_cache_root(ctx: StageContext) -> Path | None:
    if os.environ.get(ENGINE_CACHE_ENV):
        return Path(os.environ[ENGINE_CACHE_ENV])
    return ctx.home / "engine-cache" if ctx.home is not None else None


def cached_engine(root: Path, key: str) -> Path | None:
    """The cached engine directory for ``key``, or None (half-written entries never count)."""
    entry = root / key
    return entry / "engine" if (entry / _ENGINE_META).is_file() else None


def store_engine(root: Path, key: str, engine: Path, meta: dict[str, Any]) -> Path:
    """Copy ``engine`` into the cache under ``key`` atomically (rename of a complete directory)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(engine, tmp / "engine")
    (tmp / _ENGINE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    try:
        os.replace(tmp, root / key)
    except OSError:
        # Another build of the same key published first; its engine is equivalent by construction.
        shutil.rmtree(tmp, ignore_errors=True)
    return root / key / "engine"


def _hf_quant(src: Path) -> dict[str, Any]:
    path = src / "hf_quant_config.json"
    return dict(json.loads(path.read_text())["quantization"]) if path.is_file() else {}


def _gpu_status() -> str | None:
    """None when an engine can be built here, else what is missing."""
    missing = []
    if importlib.util.find_spec("tensorrt_llm") is None:
        missing.append("no `tensorrt_llm` module")
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("no CUDA GPU")
    except ImportError:
        missing.append("no torch")
    return " and ".join(missing) or None


def run_tensorrt_llm(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    src = ctx.input_path(stage.from_)
    out = ctx.output_dir / "artifact"
    summary = write_spec(stage, src, out)
    print(f"extra_llm_api_options.yaml:\n{(out / 'extra_llm_api_options.yaml').read_text()}")
    if summary["trtllm_build"]:
        print("trtllm-build:\n" + trtllm.shell(summary["trtllm_build"]))
    if getattr(ctx.workflow, "target", "local") == "kubernetes":
        # A GPU node builds it: an EngineBuild resource, reconciled by the build controller.
        from forgeline_operators.build.kube_target import build_on_kubernetes

        return build_on_kubernetes(ctx, summary, src, out)
    missing = _gpu_status()
    if missing is not None:
        raise OperatorError(CPU_STOP.format(version=trtllm.TRTLLM_VERSION, found=missing))
    if summary["trtllm_build"] is None:
        # The PyTorch backend loads the HF checkpoint directly: the profile is the artifact.
        ctx.set_tags({"forgeline.build.engine": "tensorrt-llm", "forgeline.build.form": "llm-api"})
        return StageResult(outputs={"artifact": out}, metrics={})
    cache = summary["engine_cache"]
    root = engine_cache_root(ctx)
    hit = cached_engine(root, cache["key"]) if root is not None and stage.cache else None
    if hit is not None:
        shutil.copytree(hit, out / "engine")
        engines = sorted(p.name for p in (out / "engine").glob("rank*.engine"))
        ctx.set_tags({"forgeline.build.engine": "tensorrt-llm", "forgeline.build.form": "engine",
                      "forgeline.build.engine_cache": "hit"})  # fmt: skip
        return StageResult(
            outputs={"artifact": out}, metrics={"engines": float(len(engines)), "engine_cache_hit": 1.0}
        )
    done = subprocess.run(summary["trtllm_build"], capture_output=True, text=True, check=False)
    print(done.stdout[-20000:], done.stderr[-20000:])
    if done.returncode != 0:
        raise OperatorError(f"trtllm-build exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    engines = sorted(p.name for p in (out / "engine").glob("rank*.engine"))
    if root is not None:
        store_engine(root, cache["key"], out / "engine", cache)
    ctx.set_tags({"forgeline.build.engine": "tensorrt-llm", "forgeline.build.form": "engine",
                  "forgeline.build.engine_cache": "miss"})  # fmt: skip
    return StageResult(
        outputs={"artifact": out}, metrics={"engines": float(len(engines)), "engine_cache_hit": 0.0}
    )
