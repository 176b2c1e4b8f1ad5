"""The build stage's model: the engine to build for and that engine's settings (its own model, from
its folder under ``engines/``). The operator's ``stage_model``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from forgeline.sdk import Ref, StageBase
from forgeline_operators.engines.openvino.settings import OpenvinoBuildSpec
from forgeline_operators.engines.tensorrt_llm.settings import TrtllmBuildSpec


class BuildStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("from",)
    outputs: ClassVar[tuple[str, ...]] = ("artifact",)
    primary_output: ClassVar[str | None] = "artifact"

    kind: Literal["build"] = Field(description="Build the serving artifact for an engine.")
    engine: Literal["tensorrt-llm", "openvino"] = Field(description="Serving engine to build for.")
    from_: Ref = Field(alias="from", description="Checkpoint to build from.")
    tensorrt_llm: TrtllmBuildSpec | None = Field(default=None, description="TensorRT-LLM build settings.")
    openvino: OpenvinoBuildSpec | None = Field(default=None, description="OpenVINO export settings.")

    def refs(self) -> dict[str, str]:
        return {"from": self.from_}

    def backend_name(self) -> str | None:
        return self.engine
