"""The TensorRT-LLM engine (GPU): engines built by the build stage, served by Triton's TRT-LLM image.

This folder owns everything TensorRT-LLM-specific: ``trtllm`` (every TensorRT-LLM setting name
Forgeline writes: the ``trtllm-build`` command, the LLM-API options, the engine cache key; shared by
the build stage and serving), ``repository`` (NVIDIA's ``inflight_batcher_llm`` and ``llmapi``
repository layouts), ``trtllm_preprocessing`` / ``trtllm_postprocessing`` (the python models copied
into the ensemble) and ``engine`` (the :class:`~forgeline_operators.engines.Engine` object,
:data:`ENGINE`). Other packages import this facade.
"""

from __future__ import annotations

from forgeline_operators.engines.tensorrt_llm import trtllm
from forgeline_operators.engines.tensorrt_llm.engine import ENGINE, TensorrtLlmEngine, is_trtllm_artifact

__all__ = ["ENGINE", "TensorrtLlmEngine", "is_trtllm_artifact", "trtllm"]
