"""The build stage: OpenVINO IR for the CPU runtime, TensorRT-LLM engine / LLM-API profile for GPUs."""

from forgeline_operators.build.operator import CPU_STOP, run_openvino, run_tensorrt_llm

__all__ = ["CPU_STOP", "run_openvino", "run_tensorrt_llm"]
