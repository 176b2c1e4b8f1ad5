"""The build operator's container entrypoint: ``python -m forgeline_operators.build.engine_job``.

What the ``EngineBuild`` Job (:mod:`.k8s`) runs on a GPU node: render and validate the build spec for
a checkpoint on the shared volume (the same :func:`.operator.write_spec` the build stage uses), check
that this node's TensorRT-LLM release and GPU give the cache key the resource was planned with, reuse
a cached engine of that key or run ``trtllm-build``, store it in the shared engine cache and publish
the output directory atomically with a sha256 manifest. The result -- phase, engine path, sha256, key,
cache hit or miss, or the failure -- is one JSON object on stdout and in the pod's termination message
(``/dev/termination-log``), which the controller copies into the resource's status.

Exit codes: 0 built or reused, 2 this node cannot build (no GPU / no ``tensorrt_llm``), 3 the node's
key differs from the resource's, 1 the build failed. The build itself needs a GPU and is untested
here; rendering, the key check, the cache-hit path and the failure reports are tested on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from forgeline.artifacts import new_staging_dir, publish
from forgeline.runtime.context import OperatorError
from forgeline_operators.build.operator import (
    CPU_STOP,
    _gpu_status,
    cached_engine,
    store_engine,
    write_spec,
)
from forgeline_operators.engines.tensorrt_llm import trtllm
from forgeline_operators.engines.tensorrt_llm.settings import TrtllmBuildSpec

__all__ = ["main", "run"]

EXIT_FAILED, EXIT_CANNOT_BUILD, EXIT_KEY_MISMATCH = 1, 2, 3


class BuildFailed(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


def run(
    checkpoint: Path, settings: dict[str, Any], out: Path, cache: Path, expect_key: str | None
) -> dict[str, Any]:
    """Build (or reuse) the engine for ``checkpoint`` into ``out``; the result for the resource's status."""
    spec = TrtllmBuildSpec.model_validate(settings)
    staging = new_staging_dir(out)
    try:
        try:
            summary = write_spec(SimpleNamespace(tensorrt_llm=spec), checkpoint, staging)
        except OperatorError as e:
            raise BuildFailed(EXIT_FAILED, "InvalidSpec", str(e)) from e
        key = summary["engine_cache"]["key"]
        if expect_key and key != expect_key:
            sources = summary["engine_cache"]["sources"]
            raise BuildFailed(
                EXIT_KEY_MISMATCH,
                "KeyMismatch",
                f"this node gives engine key {key[:12]} but the resource expects {expect_key[:12]}: "
                f"TensorRT-LLM version / GPU arch here ({sources}) differ from what was planned; "
                "schedule the Job on a matching node or re-plan with this node's version and gpu_arch",
            )
        result: dict[str, Any] = {"cacheKey": key}
        if summary["trtllm_build"] is None:
            # An HF checkpoint: the PyTorch backend loads it directly; the profile is the artifact.
            result.update(form="llm-api", cache="none")
        else:
            hit = cached_engine(cache, key)
            if hit is not None:
                shutil.copytree(hit, staging / "engine")
                result.update(form="engine", cache="hit")
            else:
                missing = _gpu_status()
                if missing is not None:
                    message = CPU_STOP.format(version=trtllm.TRTLLM_VERSION, found=missing)
                    raise BuildFailed(EXIT_CANNOT_BUILD, "NoGPU", message)
                # write_spec rendered the command with --output_dir staging/engine.
                done = subprocess.run(summary["trtllm_build"], capture_output=True, text=True, check=False)
                sys.stderr.write(done.stdout[-20000:] + done.stderr[-20000:])
                if done.returncode != 0:
                    tail = done.stderr.strip()[-2000:]
                    raise BuildFailed(
                        EXIT_FAILED, "BuildFailed", f"trtllm-build exited {done.returncode}: {tail}"
                    )
                store_engine(cache, key, staging / "engine", summary["engine_cache"])
                result.update(form="engine", cache="miss")
        manifest = publish(staging, out, {"engine_cache_key": key, "form": result["form"]}, replace=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    engines = (
        sorted(p.name for p in (out / "engine").glob("rank*.engine")) if (out / "engine").is_dir() else []
    )
    return {"phase": "Succeeded", "path": str(out), "sha256": manifest.digest, "engines": engines, **result}


def _report(result: dict[str, Any], termination_log: Path | None) -> None:
    text = json.dumps(result, sort_keys=True)
    print(text)
    if termination_log is not None:
        # Kubernetes keeps at most 4096 bytes; outside a pod stdout is the report.
        with contextlib.suppress(OSError):
            termination_log.write_text(text[:4096])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m forgeline_operators.build.engine_job", description=__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (HF or TRT-LLM)")
    p.add_argument("--settings", required=True, help="the build stage's tensorrt_llm settings (JSON)")
    p.add_argument("--out", type=Path, required=True, help="output directory, published atomically")
    p.add_argument("--cache", type=Path, required=True, help="shared engine cache directory")
    p.add_argument("--expect-key", default=None, help="engine cache key the resource was planned with")
    p.add_argument("--termination-log", type=Path, default=Path("/dev/termination-log"))
    args = p.parse_args(argv)
    try:
        settings = json.loads(args.settings)
        result = run(args.checkpoint, settings, args.out, args.cache, args.expect_key)
    except BuildFailed as e:
        _report({"phase": "Failed", "reason": e.reason, "message": str(e)}, args.termination_log)
        return e.code
    except (ValueError, OSError) as e:  # bad settings JSON / pydantic errors, unreadable checkpoint
        _report({"phase": "Failed", "reason": "InvalidInput", "message": str(e)}, args.termination_log)
        return EXIT_FAILED
    _report(result, args.termination_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
