"""``run(ctx)`` of the distill stage: a smaller student trained on a frozen teacher's soft targets.

The student is a model reference (typically a prune stage's checkpoint: prune, then distill to
recover) or a shape derived from the teacher (``student: {num_hidden_layers: 1}``: those teacher
layers copied, see :mod:`._surgery`). Rows come from the workflow's sft or text datasets, split and
tokenised exactly as the finetune stage does (:func:`forgeline_operators.lib.train_rows.split_rows`,
:func:`~forgeline_operators.lib.train_rows.sft_features`), and the objective is in :mod:`._distill_train`.

Measured and logged to the stage's MLflow run: parameters and weight bytes of teacher and student,
held-out loss / perplexity of the teacher and of the student before and after training, and the
held-out KL(teacher || student) at T = 1 before and after. Output ``checkpoint``: the student as a
plain HF checkpoint with the teacher's tokenizer. Runs on CPU (the GPU path is not built: the plan
rejects ``resources.device: gpu`` for this stage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline_operators.data import Example, pad_token_id
from forgeline_operators.distill._train import train
from forgeline_operators.distill.spec import DistillStage
from forgeline_operators.lib import measure
from forgeline_operators.lib.hf_checkpoint import load_causal_lm, load_tokenizer
from forgeline_operators.lib.surgery import evenly_spaced, rebuild
from forgeline_operators.lib.train_rows import sft_features, split_rows

__all__ = ["EVAL_ROWS", "META", "run"]

EVAL_ROWS = 64  # held-out rows every before/after number is measured on
META = "forgeline_distill.json"


def _student(ctx: StageContext, stage: DistillStage, teacher: Any) -> tuple[Any, str]:
    """The student model and a description of where it came from."""
    if isinstance(stage.student, str):
        return load_causal_lm(ctx.input_path(stage.student), torch.float32), stage.student
    shape = stage.student
    total = teacher.config.num_hidden_layers
    if shape.num_hidden_layers > total:
        raise OperatorError(
            f"student.num_hidden_layers={shape.num_hidden_layers} exceeds the teacher's {total} layers"
        )
    layers = list(shape.layers) if shape.layers is not None else evenly_spaced(total, shape.num_hidden_layers)
    return rebuild(teacher, layers=layers), f"teacher layers {layers}"


def _examples(
    ctx: StageContext, stage: DistillStage, tokenizer: Any
) -> tuple[list[Example], list[Example], dict[str, float]]:
    dataset = ctx.dataset(stage.dataset)
    fmt = dataset.format
    if fmt not in ("sft", "text"):
        raise OperatorError(
            f"distill needs a dataset of format 'sft' or 'text'; {stage.dataset!r} is {fmt!r}"
        )
    t = stage.training
    train_rows, eval_rows = split_rows(ctx, stage.dataset, stage.eval_dataset, t.eval_fraction, t.seed)
    feats = sft_features(tokenizer, train_rows, eval_rows, fmt, t.max_seq_len, dataset.rendering)
    train_ex = [Example(f["input_ids"], f["labels"], False) for f in feats.train]
    eval_ex = [Example(f["input_ids"], f["labels"], False) for f in feats.eval][:EVAL_ROWS]
    if not train_ex:
        raise OperatorError(f"nothing to distill on: no row of {stage.dataset!r} has a graded token")
    if not eval_ex:
        raise OperatorError(
            "no held-out rows to measure the student on: set eval_dataset or training.eval_fraction > 0"
        )
    counts = {
        "train_rows": float(len(train_ex)),
        "eval_rows": float(len(eval_ex)),
        "truncated_rows": float(feats.truncated_rows),
        "dropped_rows": float(feats.dropped_rows),
    }
    return train_ex, eval_ex, counts


def _quality(
    prefix: str, student: Any, teacher: Any, examples: list[Example], pad_id: int
) -> dict[str, float]:
    loss = measure.held_out_loss(student, examples, pad_id)
    return {
        f"{prefix}eval_loss": loss,
        f"{prefix}eval_perplexity": measure.perplexity(loss),
        f"{prefix}eval_kl": measure.held_out_kl(student, teacher, examples, pad_id),
    }


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    assert isinstance(stage, DistillStage)
    torch.set_num_threads(ctx.threads)
    teacher_dir = ctx.input_path(stage.teacher)
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_causal_lm(teacher_dir, torch.float32)
    teacher.eval()
    student, source = _student(ctx, stage, teacher)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise OperatorError(
            f"student vocabulary ({student.config.vocab_size}) differs from the teacher's "
            f"({teacher.config.vocab_size}): soft targets need the same tokenizer"
        )
    train_ex, eval_ex, counts = _examples(ctx, stage, tokenizer)
    pad_id = pad_token_id(tokenizer)
    teacher_loss = measure.held_out_loss(teacher, eval_ex, pad_id)
    metrics: dict[str, float] = {
        **counts,
        "teacher_params": float(measure.parameters(teacher)),
        "student_params": float(measure.parameters(student)),
        "teacher_eval_loss": teacher_loss,
        "teacher_eval_perplexity": measure.perplexity(teacher_loss),
        **_quality("initial_", student, teacher, eval_ex, pad_id),
    }
    metrics["params_ratio"] = metrics["student_params"] / metrics["teacher_params"]
    ctx.log_params({"student_source": source, "temperature": stage.distill.temperature})
    outcome = train(student, teacher, train_ex, pad_id, stage.distill, stage.training, ctx.sink)
    metrics.update(_quality("", student, teacher, eval_ex, pad_id))
    losses = [h["loss"] for h in outcome.history]
    metrics.update(
        {
            "steps": float(outcome.steps),
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "tokens_per_second": outcome.tokens_per_second,
        }
    )
    out = ctx.output_dir / "checkpoint"
    student.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    metrics["student_size_bytes"] = float(measure.weight_bytes(out))
    metrics["teacher_size_bytes"] = float(measure.weight_bytes(teacher_dir))
    metrics["size_ratio"] = metrics["student_size_bytes"] / max(metrics["teacher_size_bytes"], 1.0)
    ctx.log_metrics(metrics, step=outcome.steps)
    meta = {"teacher": stage.teacher, "student": source, **stage.distill.model_dump(), "metrics": metrics}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    ctx.set_tags({"forgeline.distill.student": source})
    return StageResult(outputs={"checkpoint": Path(out)}, metrics=metrics)
