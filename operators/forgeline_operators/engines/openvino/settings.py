"""The OpenVINO engine's build settings (a build stage's ``openvino:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgeline.sdk import StrictModel


class OpenvinoBuildSpec(StrictModel):
    weight_format: Literal["fp32", "fp16", "int8", "int4"] | None = Field(
        default=None, description="Weight format of the IR (default: from the quantize stage, else fp32)."
    )
