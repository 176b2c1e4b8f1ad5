"""``run(ctx)`` of the quantize stage: ModelOpt PTQ or NNCF weight compression, gated against the parent.

* ModelOpt formats (fp8, int8_sq, int8, int4_awq, w4a8_awq; nvfp4 on GPU) calibrate on the first
  ``calibration.samples`` rows of the workflow's own dataset, tokenised like training
  (:mod:`forgeline_operators.data`). Output ``checkpoint`` is the unified HF checkpoint; with
  ``export_trtllm`` also ``trtllm_checkpoint`` (TP/PP-sharded). The gate scores the calibrated model
  as ModelOpt simulates it (fake quantization): the numerics the exported scales encode.
* NNCF formats (nncf_int8, nncf_int4) compress the weights of the OpenVINO IR (data-free); output
  ``checkpoint`` is that IR with tokenizer IRs, ready for the openvino build and OpenVINO GenAI. The
  gate runs the real compressed IR on the OpenVINO CPU runtime at f32.

The gate's held-out rows are ``gate.dataset`` or, by default, the calibration dataset's rows after
the calibration samples, so calibration data never grades itself. Metrics are logged before the gate
is checked, so a failed gate still leaves its numbers in the tracking run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline_operators.data import Example, encode_rows, pad_token_id
from forgeline_operators.quantize.gate import check_gate, compare

__all__ = ["GATE_ROWS", "run"]

GATE_ROWS = 64  # held-out rows scored by both models
NNCF_FORMATS = {"nncf_int8": "int8", "nncf_int4": "int4"}
META = "forgeline_quant.json"


def _validate(stage: Any) -> None:
    if stage.format in NNCF_FORMATS and stage.export_trtllm is not None:
        raise OperatorError(
            f"export_trtllm needs a ModelOpt format; {stage.format!r} targets the OpenVINO CPU runtime"
        )
    if stage.format in NNCF_FORMATS and stage.export_dtype is not None:
        raise OperatorError(
            f"export_dtype is a ModelOpt export option; {stage.format!r} writes an OpenVINO IR (drop it)"
        )
    if stage.format in NNCF_FORMATS and stage.kv_cache_dtype != "none":
        raise OperatorError(f"kv_cache_dtype={stage.kv_cache_dtype!r} is a ModelOpt option; use none")
    if stage.calibration is None and (stage.format not in NNCF_FORMATS or stage.gate.dataset is None):
        what = "calibration and the gate" if stage.format not in NNCF_FORMATS else "the gate"
        raise OperatorError(f"format {stage.format!r}: set calibration.dataset (data for {what})")


def _rows(ctx: StageContext, name: str) -> tuple[list[dict[str, Any]], str, str]:
    dataset = ctx.dataset(name)
    return ctx.read_rows(name), dataset.format, dataset.rendering


def _data(ctx: StageContext, stage: Any, tokenizer: Any) -> tuple[list[list[int]], list[Example]]:
    """Calibration token rows and held-out gate examples."""
    calib = stage.calibration
    max_len = calib.max_seq_len if calib else 256
    calibration: list[list[int]] = []
    used = 0
    if calib is not None:
        rows, fmt, rendering = _rows(ctx, calib.dataset)
        used = min(calib.samples, len(rows))
        calibration = [
            ex.input_ids for ex in encode_rows(tokenizer, rows[:used], fmt, max_len, rendering).examples
        ]
    gate_name = stage.gate.dataset or calib.dataset
    rows, fmt, rendering = _rows(ctx, gate_name)
    held_out = rows[used : used + GATE_ROWS] if calib is not None and gate_name == calib.dataset else rows
    held_out = held_out[:GATE_ROWS]
    if not held_out:
        raise OperatorError(
            f"no held-out rows for the gate: dataset {gate_name!r} has {len(rows)} rows and calibration "
            f"uses the first {used}; set gate.dataset or lower calibration.samples"
        )
    examples = encode_rows(tokenizer, held_out, fmt, max_len, rendering).examples
    if sum(ex.graded_tokens for ex in examples) == 0:
        raise OperatorError(f"gate dataset {gate_name!r}: no graded tokens within max_seq_len={max_len}")
    return calibration, examples


def _load(path: Path) -> Any:
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def _weight_bytes(directory: Path) -> int:
    patterns = ("*.safetensors", "openvino_model.bin")
    return sum(p.stat().st_size for pattern in patterns for p in directory.glob(pattern))


def _export_modelopt(ctx: StageContext, stage: Any, model: Any, tokenizer: Any) -> dict[str, Path]:
    from forgeline_operators.lib import modelopt_ptq as mo

    out = ctx.output_dir / "checkpoint"
    mo.export_hf(model, out, stage.export_dtype or mo.DEFAULT_EXPORT_DTYPE)
    tokenizer.save_pretrained(str(out))  # a checkpoint serving stacks can load on its own
    outputs = {"checkpoint": out}
    if stage.export_trtllm is not None:
        trt = ctx.output_dir / "trtllm_checkpoint"
        mo.export_trtllm(model, trt, stage.export_trtllm.tp, stage.export_trtllm.pp)
        outputs["trtllm_checkpoint"] = trt
    return outputs


def _quantize(
    ctx: StageContext, stage: Any, parent_dir: Path, calibration: Sequence[list[int]]
) -> tuple[Any, dict[str, Path], dict[str, str]]:
    """The quantized model to gate, outputs written so far, and library provenance."""
    if stage.format in NNCF_FORMATS:
        import nncf

        from forgeline_operators.engines.openvino.ir import export_ir, load_ov_model

        out = ctx.output_dir / "checkpoint"
        export_ir(parent_dir, out, NNCF_FORMATS[stage.format], ctx.work_dir)
        return load_ov_model(out), {"checkpoint": out}, {"library": "nncf", "version": nncf.__version__}
    import modelopt

    from forgeline_operators.lib import modelopt_ptq as mo

    model = mo.quantize(_load(parent_dir), stage.format, stage.kv_cache_dtype, calibration)
    return model, {}, {"library": "nvidia-modelopt", "version": modelopt.__version__}


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    torch.set_num_threads(ctx.threads)
    _validate(stage)
    parent_dir = ctx.input_path(stage.model)
    tokenizer = AutoTokenizer.from_pretrained(str(parent_dir))
    calibration, examples = _data(ctx, stage, tokenizer)
    started = time.time()
    quantized, outputs, provenance = _quantize(ctx, stage, parent_dir, calibration)
    seconds = time.time() - started
    result = compare(_load(parent_dir), quantized, examples, pad_token_id(tokenizer))
    metrics = {**result.metrics(), "quantize_seconds": seconds, "calibration_rows": float(len(calibration))}
    ctx.log_metrics(metrics)
    check_gate(stage.gate, result, stage.format)
    if not outputs:
        outputs = _export_modelopt(ctx, stage, quantized, tokenizer)
    size, parent_size = _weight_bytes(outputs["checkpoint"]), _weight_bytes(parent_dir)
    sizes = {
        "size_bytes": float(size),
        "parent_size_bytes": float(parent_size),
        "size_ratio": size / parent_size,
    }
    metrics.update(sizes)
    ctx.log_metrics(sizes)
    if stage.format not in NNCF_FORMATS:
        from forgeline_operators.lib.modelopt_ptq import DEFAULT_EXPORT_DTYPE

        provenance["export_dtype"] = stage.export_dtype or DEFAULT_EXPORT_DTYPE
    meta = {"format": stage.format, "parent": stage.model, **provenance, **_algo(outputs), "metrics": metrics}
    (outputs["checkpoint"] / META).write_text(json.dumps(meta, indent=2) + "\n")
    ctx.set_tags(
        {"forgeline.quantize.format": stage.format, "forgeline.quantize.library": provenance["library"]}
    )
    return StageResult(outputs=dict(outputs), metrics=metrics)


def _algo(outputs: dict[str, Path]) -> dict[str, Any]:
    hf_quant = outputs["checkpoint"] / "hf_quant_config.json"
    if not hf_quant.is_file():
        return {}
    q = json.loads(hf_quant.read_text())["quantization"]
    return {"quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo")}
