"""The quantize stage: ModelOpt PTQ (TensorRT-LLM path) and NNCF weight compression (OpenVINO path)."""

from forgeline_operators.quantize.operator import run

__all__ = ["run"]
