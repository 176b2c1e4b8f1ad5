"""The build stage: OpenVINO IR for the CPU runtime, TensorRT-LLM engine / LLM-API profile for GPUs."""
