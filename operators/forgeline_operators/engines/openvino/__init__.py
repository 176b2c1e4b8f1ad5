"""The OpenVINO engine (CPU): OpenVINO IR artifacts served by OpenVINO GenAI inside tritonserver.

This folder owns everything OpenVINO-specific on the serving path and the IR export every stage uses:
``ir`` (what an IR is, the one exporter, weight compression, loading one back), ``__main__`` (that
export in its own process), ``repository`` (the Triton repository: ``config.pbtxt``, layout, LoRA
router), ``triton_model`` / ``lora_router`` (the python models copied into it) and ``engine`` (the
:class:`~forgeline_operators.engines.Engine` object, :data:`ENGINE`). Other packages import this facade.
"""

from __future__ import annotations

from forgeline_operators.engines.openvino import ir
from forgeline_operators.engines.openvino.engine import ENGINE, OpenvinoEngine, export_openvino
from forgeline_operators.engines.openvino.repository import (
    MANIFEST,
    AdapterRef,
    OpenvinoModelSpec,
    SpeculativeRef,
    adapter_ref,
    build_openvino_repository,
    openvino_config,
    router_config,
)

__all__ = [
    "ENGINE",
    "MANIFEST",
    "AdapterRef",
    "OpenvinoEngine",
    "OpenvinoModelSpec",
    "SpeculativeRef",
    "adapter_ref",
    "build_openvino_repository",
    "export_openvino",
    "ir",
    "openvino_config",
    "router_config",
]
