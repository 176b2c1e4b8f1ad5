"""Direct preference optimisation (method ``dpo``) with trl's ``DPOTrainer``, full or with LoRA.

Each preference row is tokenised by :mod:`forgeline_operators.data` as two sft rows -- prompt +
chosen and prompt + rejected -- so the prompt ids and the completion ids are exactly those
``evaluate`` scores, and the prompt is a shared token prefix (the prompt is tokenised on its own).
The reference model is ``dpo.reference`` when given; otherwise the starting model itself: the base
with the adapters switched off for LoRA, a frozen copy for full DPO.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from forgeline.runtime.context import MetricSink
from forgeline_operators.data import IGNORE_INDEX, encode_row, resolve_rendering
from forgeline_operators.finetune import _train
from forgeline_operators.finetune._job import TrainJob, TrainOutcome
from forgeline_operators.lib import hf_checkpoint
from forgeline_operators.lib.train_rows import Feature, Features

__all__ = ["features", "train"]


def _pair(
    tokenizer: Any, row: Mapping[str, Any], max_len: int, rendering: str
) -> tuple[Feature | None, bool]:
    """(prompt_ids, chosen_ids, rejected_ids) or None when a side has nothing left; truncated?"""
    sides = [
        encode_row(tokenizer, {"prompt": row["prompt"], "completion": row[side]}, "sft", max_len, rendering)
        for side in ("chosen", "rejected")
    ]
    truncated = any(e.truncated for e in sides)
    starts = [next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), None) for e in sides]
    if starts[0] is None or starts[1] is None or starts[0] == 0:
        return None, truncated
    k = starts[0]
    chosen, rejected = sides
    # data.py tokenises the prompt on its own (under a chat template: the conversation up to the
    # generation prompt), so both sides share it exactly.
    assert starts[1] == k and chosen.input_ids[:k] == rejected.input_ids[:k]
    return {
        "prompt_ids": chosen.input_ids[:k],
        "chosen_ids": chosen.input_ids[k:],
        "rejected_ids": rejected.input_ids[k:],
    }, truncated


def _encode(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_len: int, rendering: str
) -> tuple[list[Feature], int, int]:
    kept: list[Feature] = []
    truncated = 0
    for row in rows:
        pair, cut = _pair(tokenizer, row, max_len, rendering)
        truncated += cut
        if pair is not None:
            kept.append(pair)
    return kept, truncated, len(rows) - len(kept)


def features(
    tokenizer: Any,
    train_rows: Sequence[Mapping[str, Any]],
    eval_rows: Sequence[Mapping[str, Any]],
    max_seq_len: int,
    rendering: str = "auto",
) -> Features:
    train, truncated, dropped = _encode(tokenizer, train_rows, max_seq_len, rendering)
    evals, eval_truncated, eval_dropped = _encode(tokenizer, eval_rows, max_seq_len, rendering)
    return Features(
        train=train,
        eval=evals,
        rows=len(train_rows) + len(eval_rows),
        truncated_rows=truncated + eval_truncated,
        dropped_rows=dropped + eval_dropped,
        train_tokens=sum(
            2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in train
        ),
        rendering=resolve_rendering(tokenizer, rendering),
    )


def _trainer_class() -> Any:
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer fed rows already tokenised by forgeline_operators.data.

        trl 1.16's DPOTrainer has no ``skip_prepare_dataset`` (SFTTrainer does); its own tokenisation
        of ``prompt + chosen`` as one string merges tokens across the boundary for plain rows, which
        would train on other ids than ``evaluate`` scores. This is the only override.
        """

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    return PretokenizedDPOTrainer


def train(job: TrainJob, sink: MetricSink | None) -> TrainOutcome:
    from datasets import Dataset
    from trl import DPOConfig

    _train.setup_process(job)
    dpo = job.stage.dpo
    tokenizer = hf_checkpoint.load_tokenizer(job.base_dir)
    model, peft_config = _train.load_policy(job)
    reference = None
    if job.reference_dir is not None:
        reference = _train.load_model(job, job.reference_dir)
    elif not job.adapter:
        reference = _train.load_model(job, job.base_dir)
    args = DPOConfig(
        **_train.common_args(job),
        beta=dpo.beta if dpo else 0.1,
        loss_type=[dpo.loss if dpo else "sigmoid"],
    )
    callback = _train.MetricsCallback(sink, job)
    trainer = _trainer_class()(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(job.features.train),
        eval_dataset=Dataset.from_list(job.features.eval) if job.features.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    resume = _train.prepare_resume(job)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return _train.finish(job, trainer, result, resume, callback, tokenizer)
