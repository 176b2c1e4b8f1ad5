"""The OpenVINO engine object (:data:`ENGINE`, entry point ``forgeline.engines: openvino``).

It owns the CPU runtime's choices as the :class:`~forgeline_operators.engines.Engine` protocol states
them: the artifact is an OpenVINO IR with its tokenizer IRs (:func:`.ir.is_ir`); ``prepare`` exports
an HF checkpoint to an fp32 IR with :func:`.ir.export_ir` in a subprocess pinned to the caller's
threads; ``write_repository`` maps the generic :class:`~forgeline_operators.engines.ServingSettings`
onto :class:`.repository.OpenvinoModelSpec` (LoRA scales read from each adapter's config) and writes
the decoupled python model of :mod:`.repository`. It runs in the local tritonserver's python backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from forgeline.runtime.context import OperatorError
from forgeline_operators.engines import (
    EngineCapabilities,
    Repository,
    ServerRequirement,
    ServingSettings,
)
from forgeline_operators.engines.openvino.ir import is_ir
from forgeline_operators.engines.openvino.repository import (
    OpenvinoModelSpec,
    SpeculativeRef,
    adapter_ref,
    build_openvino_repository,
    openvino_config,
)

__all__ = ["ENGINE", "OpenvinoEngine", "export_openvino", "model_spec"]


def export_openvino(hf_dir: Path, out_dir: Path, weight_format: str = "fp32", threads: int = 1) -> Path:
    """``hf_dir`` exported to an IR at ``out_dir`` by :mod:`.__main__` (one process, ``threads`` wide)."""
    if not (hf_dir / "config.json").exists():
        raise OperatorError(f"{hf_dir} is neither an OpenVINO IR nor an HF checkpoint (no config.json)")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "forgeline_operators.engines.openvino", str(hf_dir), str(tmp), weight_format]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not is_ir(tmp):
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise OperatorError(f"OpenVINO export of {hf_dir} failed (exit {proc.returncode}):\n{tail}")
    tmp.rename(out_dir)
    return out_dir


def model_spec(settings: ServingSettings) -> OpenvinoModelSpec:
    """The engine's own settings for ``settings``; ValueError on an unfit adapter or draft."""
    adapters = {}
    for name, path in sorted(settings.adapters.items()):
        try:
            adapters[name] = adapter_ref(path)
        except (ValueError, KeyError) as e:
            raise ValueError(f"adapter {name!r} ({path}): {e}") from None
    draft = None if settings.draft is None else SpeculativeRef(settings.draft, settings.num_assistant_tokens)
    return OpenvinoModelSpec(
        name=settings.name,
        scheduler=settings.scheduler,
        threads=settings.threads,
        adapters=adapters,
        speculative=draft,
    )


class OpenvinoEngine:
    """OpenVINO GenAI continuous batching in a decoupled Triton python model (CPU)."""

    name = "openvino"
    server = ServerRequirement(name="tritonserver", backends=("python",), runs_here=True)
    capabilities = EngineCapabilities(devices=frozenset({"cpu"}), lora=True, speculative_decoding=True)

    def accepts(self, path: Path) -> bool:
        return is_ir(path)

    def prepare(self, model_dir: Path, work_dir: Path, threads: int = 1) -> Path:
        if self.accepts(model_dir):
            return model_dir
        return export_openvino(model_dir, work_dir / "openvino", threads=threads)

    def check(self, settings: ServingSettings) -> None:
        """Refuse settings the engine cannot run (before any export): ValueError."""
        openvino_config(model_spec(settings))

    def write_repository(self, dest: Path, artifact: Path, settings: ServingSettings) -> Repository:
        spec = model_spec(settings)
        build_openvino_repository(dest, artifact, spec)
        s = spec.scheduler
        params: dict[str, str | int | float | bool] = {
            "max_num_seqs": s.max_num_seqs,
            "max_batched_tokens": s.max_batched_tokens,
            "prefix_caching": s.prefix_caching,
            "inference_precision": s.inference_precision,
            "kv_cache_precision": s.engine_kv_cache_precision,
            "engine_threads": spec.threads,
            "adapters": ",".join(sorted(spec.adapters)),
            "lora_scales": ",".join(f"{n}={a.alpha:g}" for n, a in sorted(spec.adapters.items())),
            "num_assistant_tokens": spec.speculative.num_assistant_tokens if spec.speculative else 0,
        }
        return Repository(dest, params)


ENGINE = OpenvinoEngine()
