"""Plan hooks of the build kind: a TensorRT-LLM engine build takes tp x pp GPUs (on the cluster
under ``target: kubernetes``: an EngineBuild Job), and the plan says what its engine cache key
uses where the planning machine cannot detect it. OpenVINO builds need no GPU. Imports nothing
heavy."""

from __future__ import annotations

import importlib.util
from typing import Any

from forgeline.registry import Capabilities, ResourceRequest, StageIssue

__all__ = ["check", "resources"]


def resources(stage: Any, workflow: Any, caps: Capabilities) -> ResourceRequest:
    if stage.engine != "tensorrt-llm":
        return ResourceRequest()
    t = stage.tensorrt_llm
    return ResourceRequest(gpus=(t.tp * t.pp) if t else 1, remote=workflow.target == "kubernetes")


def check(stage: Any, workflow: Any, caps: Capabilities) -> list[StageIssue]:
    if stage.engine != "tensorrt-llm" or importlib.util.find_spec("tensorrt_llm") is not None:
        return []
    spec = stage.tensorrt_llm
    version = spec.version if spec and spec.version else None
    arch = spec.gpu_arch if spec and spec.gpu_arch else None
    note = (
        "engine cache key: tensorrt_llm is not installed here, so the key uses "
        + (f"the declared TensorRT-LLM {version}" if version else "the default TensorRT-LLM release (1.2)")
        + " and "
        + (f"the declared gpu_arch {arch}" if arch else "an undeclared GPU arch (set tensorrt_llm.gpu_arch)")
        + "; the build node checks both against what it has"
    )
    return [StageIssue(note, warning=True)]
