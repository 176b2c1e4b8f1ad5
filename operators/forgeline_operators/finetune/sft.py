"""Supervised fine-tuning (methods ``sft``, ``lora``, ``qlora``) with trl's ``SFTTrainer``.

With ``qat:`` the model is quantized and calibrated by ModelOpt before training and exported as a
quantized checkpoint after it (:mod:`forgeline_operators.quantize.qat`).

Rows are tokenised by :func:`forgeline_operators.lib.train_rows.sft_features` (through
:mod:`forgeline_operators.data`: the same ids and completion-only labels the ``evaluate`` stage
scores) and handed to the trainer pre-tokenised (``skip_prepare_dataset``), so trl neither re-renders
nor silently drops anything; rows with no completion token left within ``max_seq_len`` are counted and
excluded there instead.
"""

from __future__ import annotations

from forgeline.runtime.context import MetricSink
from forgeline_operators.finetune import _train
from forgeline_operators.finetune._job import TrainJob, TrainOutcome
from forgeline_operators.lib import hf_checkpoint

__all__ = ["train"]


def train(job: TrainJob, sink: MetricSink | None) -> TrainOutcome:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    _train.setup_process(job)
    tokenizer = hf_checkpoint.load_tokenizer(job.base_dir)
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
        parent = hf_checkpoint.load_causal_lm(job.base_dir, next(model.parameters()).dtype)
        qat_metrics.update(qat.evaluate(job, trainer.accelerator.unwrap_model(trainer.model), parent))
    outcome = _train.finish(job, trainer, result, resume, callback, tokenizer)
    outcome.metrics.update(qat_metrics)
    return outcome
