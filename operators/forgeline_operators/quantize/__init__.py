"""The quantize stage: ModelOpt PTQ (TensorRT-LLM path) and NNCF weight compression (OpenVINO path)."""
