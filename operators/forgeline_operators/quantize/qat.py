"""Quantization-aware training for the finetune stage (``qat:``), ModelOpt's quantize-then-train flow.

Before training, the model gets ModelOpt quantizers of ``qat.format`` calibrated on the first
``calibration_samples`` training rows (:func:`forgeline_operators.lib.modelopt_ptq.quantize`, the
quantize stage's own code); the normal training loop then trains through the simulated quantization
(straight-through estimator), and the result is exported like the quantize stage's output (unified HF
checkpoint with ``hf_quant_config.json``). PTQ vs QAT on the same data is measured in the same run:
the stage's eval rows are scored by the starting model, by the calibrated-but-untrained model (that
*is* PTQ of the starting model with the same calibration rows: ``ptq_perplexity``) and by the trained
quantized model (``qat_perplexity``); the gate numbers are :mod:`.gate`'s, against the starting model.

``ptq_perplexity`` is PTQ of the *starting* model, so QAT's lead over it includes the fine-tuning
itself. For PTQ vs QAT of the same fine-tune, run ``finetune`` (sft) -> ``quantize`` with
``gate.dataset: X`` beside ``finetune`` (sft, ``qat``) with ``eval_dataset: X``: both score the first
:data:`GATE_ROWS` rows of X with the same scorer (set calibration.max_seq_len equal to
training.max_seq_len), so the quantize stage's ``perplexity`` and ``qat_perplexity`` compare directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forgeline.runtime.context import OperatorError
from forgeline_operators.data import Example
from forgeline_operators.lib import measure
from forgeline_operators.quantize.gate import GateResult, check_gate, compare
from forgeline_operators.quantize.operator import GATE_ROWS

__all__ = ["GATE_ROWS", "check", "eval_examples", "evaluate", "prepare"]


def eval_examples(job: Any) -> list[Example]:
    examples = [Example(f["input_ids"], f["labels"], False) for f in job.features.eval][:GATE_ROWS]
    if not examples:
        raise OperatorError(
            "qat scores PTQ vs QAT on held-out rows: set eval_dataset or training.eval_fraction > 0"
        )
    return examples


def prepare(job: Any, model: Any) -> tuple[Any, dict[str, float]]:
    """Insert and calibrate the quantizers; returns the model and the PTQ number (before training)."""
    from forgeline_operators.lib import modelopt_ptq as mo

    qat = job.stage.qat
    calibration = [f["input_ids"] for f in job.features.train[: qat.calibration_samples]]
    model = mo.quantize(model, qat.format, "none", calibration)
    model.eval()
    loss = measure.held_out_loss(model, eval_examples(job), job.pad_id)
    model.train()
    return model, {
        "ptq_eval_loss": loss,
        "ptq_perplexity": measure.perplexity(loss),
        "qat_calibration_rows": float(len(calibration)),
    }


def evaluate(job: Any, model: Any, parent: Any) -> dict[str, float]:
    """Gate numbers of the trained quantized model vs ``parent`` (the unquantized starting model)."""
    model.eval()
    result = compare(parent, model, eval_examples(job), job.pad_id)
    return {**result.metrics(), "qat_perplexity": result.perplexity}


def check(qat: Any, metrics: Mapping[str, float]) -> None:
    """Apply ``qat.gate`` to the logged numbers (raises GateFailed with them)."""
    result = GateResult(
        perplexity=metrics["perplexity"],
        parent_perplexity=metrics["parent_perplexity"],
        token_agreement=metrics["token_agreement"],
        tokens=int(metrics["gate_tokens"]),
        rows=int(metrics["gate_rows"]),
    )
    check_gate(qat.gate, result, f"qat {qat.format}")
