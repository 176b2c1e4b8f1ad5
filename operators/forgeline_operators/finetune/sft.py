"""Supervised fine-tuning (methods ``sft``, ``lora``, ``qlora``) with trl's ``SFTTrainer``.

With ``qat:`` the model is quantized and calibrated by ModelOpt before training and exported as a
quantized checkpoint after it (:mod:`forgeline_operators.quantize.qat`).

Rows are tokenised by :mod:`forgeline_operators.data` -- the same ids and completion-only labels the
``evaluate`` stage scores -- and handed to the trainer pre-tokenised (``skip_prepare_dataset``), so
trl neither re-renders nor silently drops anything; rows with no completion token left within
``max_seq_len`` are counted and excluded here instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from forgeline.runtime.context import MetricSink
from forgeline_operators.data import IGNORE_INDEX, encode_rows, resolve_rendering
from forgeline_operators.finetune import _train
from forgeline_operators.finetune._job import Feature, Features, TrainJob, TrainOutcome

__all__ = ["features", "train"]


def _encode(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], fmt: str, max_len: int, rendering: str
) -> tuple[list[Feature], int, int]:
    tokenized = encode_rows(tokenizer, rows, fmt, max_len, rendering)
    kept = [
        {"input_ids": e.input_ids, "labels": e.labels}
        for e in tokenized.examples
        if any(label != IGNORE_INDEX for label in e.labels[1:])
    ]
    return kept, tokenized.truncated_rows, len(rows) - len(kept)


def features(
    tokenizer: Any,
    train_rows: Sequence[Mapping[str, Any]],
    eval_rows: Sequence[Mapping[str, Any]],
    fmt: str,
    max_seq_len: int,
    rendering: str = "auto",
) -> Features:
    train, truncated, dropped = _encode(tokenizer, train_rows, fmt, max_seq_len, rendering)
    evals, eval_truncated, eval_dropped = _encode(tokenizer, eval_rows, fmt, max_seq_len, rendering)
    return Features(
        train=train,
        eval=evals,
        rows=len(train_rows) + len(eval_rows),
        truncated_rows=truncated + eval_truncated,
        dropped_rows=dropped + eval_dropped,
        train_tokens=sum(len(f["input_ids"]) for f in train),
        rendering=resolve_rendering(tokenizer, rendering),
    )


def train(job: TrainJob, sink: MetricSink | None) -> TrainOutcome:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    _train.setup_process(job)
    tokenizer = _train.load_tokenizer(job.base_dir)
    model, peft_config = _train.load_policy(job)
    qat_metrics: dict[str, float] = {}
    if job.stage.qat is not None:
        from forgeline_operators.quantize import qat

        model, qat_metrics = qat.prepare(job, model)
    args = SFTConfig(
        **_train.common_args(job),
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenised by forgeline_operators.data
        completion_only_loss=None,
    )
    callback = _train.MetricsCallback(sink, job)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(job.features.train),
        eval_dataset=Dataset.from_list(job.features.eval) if job.features.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    resume = _train.prepare_resume(job)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if job.stage.qat is not None:
        parent = _train.load_causal_lm(job.base_dir, next(model.parameters()).dtype)
        qat_metrics.update(qat.evaluate(job, trainer.accelerator.unwrap_model(trainer.model), parent))
    outcome = _train.finish(job, trainer, result, resume, callback, tokenizer)
    outcome.metrics.update(qat_metrics)
    return outcome
