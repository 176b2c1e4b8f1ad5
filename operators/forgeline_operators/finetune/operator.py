"""``run(ctx)`` of the finetune stage, backend ``hf``: trl + peft (+ bitsandbytes), dp over Ray Train.

The stage's Ray task prepares everything once -- rows validated (row-numbered errors) and tokenised,
over-long rows counted, the train/eval split, the step schedule, the durable checkpoint directory --
then trains in-process (``dp: 1``) or on ``dp`` Ray Train workers, and finally moves the last
checkpoint into the published outputs. Outputs: ``adapter`` (lora, qlora, dpo with lora), ``merged``
(full methods always; adapter methods unless ``merge: false``) and ``checkpoint``.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

from forgeline.runtime.context import MetricSink, OperatorError, StageContext, StageResult
from forgeline_operators.finetune._checkpoints import durable_dir, latest_complete
from forgeline_operators.finetune._job import MetricsTarget, Schedule, TrainJob, TrainOutcome
from forgeline_operators.finetune.spec import FinetuneStage
from forgeline_operators.lib.train_rows import Features, sft_features, split_rows

__all__ = ["run", "train_entry"]

# Placement of Ray Train workers: wait at most this long for a busy cluster (never forever).
PLACEMENT_TIMEOUT_S = float(os.environ.get("FORGELINE_TRAIN_PLACEMENT_TIMEOUT_S", "120"))
_MAX_LOG_POINTS = 50  # one MLflow round trip (~30 ms) per logging step; keep a run's overhead bounded
_DEFAULT_CHECKPOINTS = 5


def train_entry(job: TrainJob, sink: MetricSink | None) -> TrainOutcome:
    """What every worker (or the stage's own process for dp=1) runs."""
    if job.stage.method == "dpo":
        from forgeline_operators.finetune import dpo

        return dpo.train(job, sink)
    from forgeline_operators.finetune import sft

    return sft.train(job, sink)


def _split(ctx: StageContext, stage: FinetuneStage) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    t = stage.training
    return split_rows(ctx, stage.dataset, stage.eval_dataset, t.eval_fraction, t.seed)


def _features(ctx: StageContext, stage: FinetuneStage, tokenizer: Any) -> Features:
    train_rows, eval_rows = _split(ctx, stage)
    max_len = stage.training.max_seq_len
    dataset = ctx.dataset(stage.dataset)
    try:
        if stage.method == "dpo":
            from forgeline_operators.finetune import dpo

            feats = dpo.features(tokenizer, train_rows, eval_rows, max_len, dataset.rendering)
        else:
            feats = sft_features(tokenizer, train_rows, eval_rows, dataset.format, max_len, dataset.rendering)
    except ValueError as e:  # a rendering the tokenizer cannot do, a template that cannot be masked
        raise OperatorError(f"dataset {stage.dataset!r}: {e}") from None
    if feats.truncated_rows:
        ctx.logger.warning(
            "%d of %d rows exceed max_seq_len=%d; their tails are not trained on",
            feats.truncated_rows,
            feats.rows,
            max_len,
        )
    if feats.dropped_rows:
        ctx.logger.warning(
            "%d of %d rows have no completion token within max_seq_len=%d and are excluded",
            feats.dropped_rows,
            feats.rows,
            max_len,
        )
    if not feats.train:
        raise OperatorError(
            f"nothing to train on: none of the {len(train_rows)} training rows has a completion token "
            f"within max_seq_len={max_len}"
        )
    return feats


def schedule(stage: FinetuneStage, train_rows: int) -> Schedule:
    """Optimizer steps (as the Trainer counts them), logging and checkpoint cadence."""
    t = stage.training
    batches = math.ceil(train_rows / (t.micro_batch_size * stage.parallelism.dp))
    per_epoch = max(1, math.ceil(batches / t.grad_accum))
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
    save = t.checkpoint_every_steps or max(1, math.ceil(total / _DEFAULT_CHECKPOINTS))
    return Schedule(total_steps=total, logging_steps=max(1, total // _MAX_LOG_POINTS), save_steps=save)


def _check(ctx: StageContext, stage: FinetuneStage) -> str:
    if stage.backend != "hf":
        raise OperatorError(f"this operator runs backend 'hf', not {stage.backend!r}")
    par = stage.parallelism
    if par.tp > 1 or par.pp > 1:
        raise OperatorError("backend 'hf' is data-parallel only (tp = pp = 1); use backend: megatron")
    device = str(ctx.workflow.resources.device)
    if device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise OperatorError("resources.device is gpu but CUDA is not available to this stage")
    elif stage.training.precision != "fp32":
        ctx.logger.warning("precision %s is for GPUs; training in fp32 on CPU", stage.training.precision)
    return device


def _cpus_per_worker(ctx: StageContext, stage: FinetuneStage) -> float:
    if stage.resources and stage.resources.cpus:
        return float(stage.resources.cpus)
    return float(ctx.workflow.resources.cpus_per_stage)


def _job(ctx: StageContext, stage: FinetuneStage, device: str) -> TrainJob:
    from forgeline_operators.data import pad_token_id
    from forgeline_operators.lib.hf_checkpoint import load_tokenizer

    base_dir = ctx.input_path(stage.base)
    if stage.method == "qlora" and (base_dir / "adapter_config.json").is_file():
        raise OperatorError(f"qlora quantizes a full checkpoint, but {stage.base} is an adapter; use merged")
    reference = stage.dpo.reference if stage.dpo else None
    tokenizer = load_tokenizer(base_dir)
    feats = _features(ctx, stage, tokenizer)
    datasets = {n: ctx.dataset(n).sha256 for n in filter(None, (stage.dataset, stage.eval_dataset))}
    identity: Mapping[str, Any] = {"stage": stage.model_dump(mode="json"), "base": str(base_dir), **datasets}
    dp = stage.parallelism.dp
    return TrainJob(
        stage=stage,
        base_dir=base_dir,
        reference_dir=ctx.input_path(reference) if reference else None,
        features=feats,
        pad_id=pad_token_id(tokenizer),
        checkpoint_dir=durable_dir(ctx.output_dir, dict(identity)),
        output_dir=ctx.output_dir,
        merge=stage.merge if stage.merge is not None else True,
        device=device,
        world_size=dp,
        threads=max(1, int(_cpus_per_worker(ctx, stage))) if dp > 1 else ctx.threads,
        schedule=schedule(stage, len(feats.train)),
        metrics=MetricsTarget(ctx.tracking_uri, ctx.run_id),
    )


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    assert isinstance(stage, FinetuneStage)
    device = _check(ctx, stage)
    job = _job(ctx, stage, device)
    feats = job.features
    ctx.log_params(
        {
            "train_rows": len(feats.train),
            "train_tokens_per_epoch": feats.train_tokens,
            "eval_rows": len(feats.eval),
            "rendering": feats.rendering,
            "total_steps": job.schedule.total_steps,
            "save_steps": job.schedule.save_steps,
            "logging_steps": job.schedule.logging_steps,
            "global_batch": stage.training.micro_batch_size * stage.training.grad_accum * job.world_size,
        }
    )
    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if job.world_size == 1:
        outcome = train_entry(job, ctx.sink)
    else:
        from forgeline_operators.finetune._ray_train import DataParallel, run_data_parallel

        layout = DataParallel(
            job.world_size, _cpus_per_worker(ctx, stage), device == "gpu", PLACEMENT_TIMEOUT_S
        )
        outcome = run_data_parallel(job, layout, ctx.work_dir / "ray-train")
    final = latest_complete(job.checkpoint_dir)
    if final is None:
        raise OperatorError(f"training finished without a complete checkpoint in {job.checkpoint_dir}")
    shutil.move(str(final), str(ctx.output_dir / "checkpoint"))
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    metrics = {
        **outcome.metrics,
        "resumed_from_step": float(outcome.resumed_from_step),
        "rows": float(feats.rows),
        "truncated_rows": float(feats.truncated_rows),
        "dropped_rows": float(feats.dropped_rows),
    }
    # At the last step, beside the step series; "loss" there is the train loss, so the headline
    # (held-out) loss stays out of the tracking run and only heads the stage's result.
    ctx.log_metrics({k: v for k, v in metrics.items() if k != "loss"}, step=int(metrics["steps"]))
    names = [*outcome.outputs, "checkpoint"]
    from forgeline_operators.evaluate.general import after_finetune

    metrics.update(after_finetune(ctx, [ctx.output_dir / name for name in outcome.outputs]))
    if stage.qat is not None:
        from forgeline_operators.quantize import qat

        ctx.set_tags(
            {"forgeline.quantize.format": stage.qat.format, "forgeline.quantize.library": "nvidia-modelopt"}
        )
        qat.check(stage.qat, metrics)  # after logging, so a failed gate leaves its numbers in the run
    return StageResult(outputs={name: ctx.output_dir / name for name in names}, metrics=metrics)
