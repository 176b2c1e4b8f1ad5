"""HF checkpoint → OpenVINO IR (+ tokenizer/detokenizer) with ``optimum-cli export openvino``.

Used when the serve stage is handed an HF checkpoint rather than the build stage's OpenVINO output
(``forgeline serve builtin://tiny-llama`` builds what it needs). The CLI is the same one users run, in
a subprocess pinned to the stage's threads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from forgeline.runtime.context import OperatorError
from forgeline_operators.serve.repository import is_openvino_ir

__all__ = ["export_openvino", "openvino_engine"]


def export_openvino(hf_dir: Path, out_dir: Path, weight_format: str = "fp32", threads: int = 1) -> Path:
    if not (hf_dir / "config.json").exists():
        raise OperatorError(f"{hf_dir} is neither an OpenVINO IR nor an HF checkpoint (no config.json)")
    cli = Path(sys.executable).with_name("optimum-cli")
    if not cli.exists():
        raise OperatorError("optimum-intel is not installed (needed to export the model to OpenVINO)")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(cli), "export", "openvino", "--model", str(hf_dir), "--task", "text-generation-with-past"]
    cmd += ["--weight-format", weight_format, str(tmp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not is_openvino_ir(tmp):
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise OperatorError(f"OpenVINO export of {hf_dir} failed (exit {proc.returncode}):\n{tail}")
    tmp.rename(out_dir)
    return out_dir


def openvino_engine(model_dir: Path, work_dir: Path, threads: int = 1) -> tuple[Path, bool]:
    """The OpenVINO IR to serve for ``model_dir``: itself, or an fp32 export; (path, exported)."""
    if is_openvino_ir(model_dir):
        return model_dir, False
    return export_openvino(model_dir, work_dir / "openvino", threads=threads), True
