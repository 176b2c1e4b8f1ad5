"""NVIDIA ModelOpt post-training quantization of a Hugging Face causal LM, and its two exports.

It owns the ModelOpt calls (preset configs per format, calibration, the unified HF and TRT-LLM
exports): the quantize stage runs them, and the finetune stage's ``qat:`` inserts the same quantizers
before training and exports its result the same way, so both go through this module.

Measured with nvidia-modelopt 0.47.0 on CPU (the newest release on PyPI here): fp8, int8_sq, int8,
int4_awq, w4a8_awq and the fp8 KV cache quantize and export; nvfp4 is declared GPU-only (TRT-LLM runs
it on Blackwell only) and ``plan`` rejects it on CPU.

* ``export_hf_checkpoint`` writes the unified HF checkpoint (``hf_quant_config.json``) that TRT-LLM's
  PyTorch backend, vLLM and NIM load.
* ``export_tensorrt_llm_checkpoint`` writes the legacy TRT-LLM checkpoint (``config.json`` +
  ``rank{i}.safetensors``, TP/PP-sharded) for ``trtllm-build``. It exists up to ModelOpt 0.47, is
  deprecated in 0.48 and removed in 0.49; with a ModelOpt that lacks it, ``export_trtllm`` fails with
  an OperatorError instead of guessing.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from forgeline.runtime.context import OperatorError

__all__ = [
    "DEFAULT_EXPORT_DTYPE",
    "EXPORT_DTYPES",
    "MODELOPT_FORMATS",
    "export_hf",
    "export_trtllm",
    "quantize",
]

# Stage format -> name of the ModelOpt preset config (modelopt.torch.quantization).
MODELOPT_FORMATS = {
    "fp8": "FP8_DEFAULT_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int8": "INT8_DEFAULT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
}
GPU_ONLY = frozenset({"nvfp4"})


def _config(fmt: str, kv_cache_dtype: str) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    cfg: dict[str, Any] = copy.deepcopy(getattr(mtq, MODELOPT_FORMATS[fmt]))
    if kv_cache_dtype == "fp8":
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, mtq.FP8_KV_CFG["quant_cfg"])
    return cfg


def quantize(model: Any, fmt: str, kv_cache_dtype: str, calibration: Sequence[list[int]]) -> Any:
    """Insert quantizers and calibrate them on ``calibration`` (token id rows); returns the model."""
    import modelopt.torch.quantization as mtq

    if fmt in GPU_ONLY and not torch.cuda.is_available():
        raise OperatorError(f"format {fmt!r} needs a CUDA GPU (set resources.device: gpu)")
    if not calibration:
        raise OperatorError(f"format {fmt!r} needs calibration rows: set calibration.dataset")

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for ids in calibration:
                m(input_ids=torch.tensor([ids], dtype=torch.long))

    return mtq.quantize(model, _config(fmt, kv_cache_dtype), forward_loop=forward_loop)


EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_EXPORT_DTYPE = "bf16"  # TRT-LLM's PyTorch backend and vLLM load bf16 checkpoints natively


def export_hf(model: Any, dest: Path, dtype: str = DEFAULT_EXPORT_DTYPE) -> None:
    """The unified HF checkpoint; ``dtype`` is that of every tensor not stored quantized (embeddings,
    norms, lm_head). Passed explicitly: ModelOpt otherwise reads ``config.torch_dtype``, which a
    model that went through a Trainer may hold as a string. Modifies ``model`` (use it no more)."""
    from modelopt.torch.export import export_hf_checkpoint

    target = EXPORT_DTYPES[dtype]
    # ModelOpt's dtype argument does not cast the tensors it leaves unquantized (embeddings, norms,
    # lm_head): they keep the model's dtype, so the model is cast first (the calibrated amax buffers
    # travel with it). Export already rewrites the model's weights in place, so this costs nothing.
    model.to(target)
    model.config.dtype = target  # config.json says what the tensors are (loaders cast by it)
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=target, export_dir=dest)


def export_trtllm(model: Any, dest: Path, tp: int, pp: int) -> None:
    """The legacy TRT-LLM checkpoint, sharded for ``tp`` x ``pp`` (ModelOpt <= 0.48 only)."""
    import modelopt
    from modelopt.torch import export as mte

    fn = getattr(mte, "export_tensorrt_llm_checkpoint", None)
    if fn is None:
        raise OperatorError(
            f"export_trtllm needs nvidia-modelopt<0.49: export_tensorrt_llm_checkpoint was removed in 0.49 "
            f"(installed: {modelopt.__version__}). Build from the unified HF checkpoint instead "
            "(TRT-LLM's PyTorch backend / LLM-API profile)."
        )
    from modelopt.torch.export.model_utils import get_model_type

    decoder = get_model_type(model)
    if decoder is None:
        raise OperatorError(f"ModelOpt cannot export {type(model).__name__} as a TRT-LLM checkpoint")
    try:
        # fp16 for the unquantized layers: what trtllm-build expects (ModelOpt warns on fp32).
        fn(
            model,
            decoder,
            dtype=torch.float16,
            export_dir=dest,
            inference_tensor_parallel=tp,
            inference_pipeline_parallel=pp,
        )
    except (NotImplementedError, AssertionError, ValueError) as e:
        raise OperatorError(f"TRT-LLM checkpoint export at tp={tp}, pp={pp} failed: {e}") from e
