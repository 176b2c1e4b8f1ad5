"""``run(ctx)`` of the finetune stage, backend ``megatron``: megatron-core TP x PP x DP on Ray Train.

The stage's task prepares everything as the hf backend does (the same row validation, tokenisation,
train/eval split and step schedule: its functions are reused), then runs :func:`.loop.run` on
``tp * pp * dp`` Ray Train workers (gloo on CPU, NCCL on GPU; megatron's parallel groups over Ray
Train's process group), or in its own process for a world of one. Resumable ``dist_checkpointing``
checkpoints live in the stage's durable checkpoint directory (a rerun after a crash resumes from the
newest complete one, at any layout); the published outputs are HF only: ``merged`` (+ ``adapter`` in
PEFT layout for LoRA). Methods: ``sft``, ``lora``, ``dpo`` (sigmoid; full or LoRA); ``qlora`` is refused
with the fix (bitsandbytes 4-bit is the hf backend's). ``training.precision: bf16`` on a GPU is
megatron's mixed precision (``Float16Module``: bf16 weights and activations, fp32 main params, Adam
state and gradient reduction; the export is the fp32 main weights); on CPU the stage trains fp32, as
the hf backend does (the bf16 path itself is tested on CPU by the unit tests). fp16 is refused (it
needs loss scaling, not wired): bf16 is the fix. Untested here (no GPU): the NCCL/CUDA path of
``resources.device: gpu`` -- the same code with the CPU compatibility layer inactive.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forgeline.artifacts import write_text_atomic
from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline_operators.finetune._checkpoints import discard_incomplete, durable_dir, latest_complete
from forgeline_operators.finetune._job import MetricsTarget, TrainOutcome
from forgeline_operators.finetune.spec import FinetuneStage

__all__ = ["MegatronJob", "run"]


@dataclass(frozen=True)
class MegatronJob:
    """What every rank receives (picklable; nothing imports megatron until a worker runs it)."""

    run: Any  # loop.Run
    dp: int
    threads: int
    metrics: MetricsTarget
    outcome_path: Path

    @property
    def world_size(self) -> int:
        return self.run.settings.tp * self.run.settings.pp * self.dp


def _check(ctx: StageContext, stage: FinetuneStage) -> None:
    if stage.backend != "megatron":
        raise OperatorError(f"this operator runs backend 'megatron', not {stage.backend!r}")
    if stage.method == "qlora":
        raise OperatorError(
            "method qlora (4-bit bitsandbytes base) runs on backend hf only; use method: lora"
        )
    if stage.method == "dpo" and stage.dpo is not None and stage.dpo.loss != "sigmoid":
        raise OperatorError(
            f"dpo.loss {stage.dpo.loss!r}: backend megatron implements only sigmoid; use backend hf"
        )
    if str(ctx.workflow.resources.device) == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise OperatorError("resources.device is gpu but CUDA is not available to this stage")
        if stage.training.precision == "fp16":
            raise OperatorError(
                "training.precision fp16: backend megatron trains fp32 or bf16 (fp16 needs loss "
                "scaling, not wired); set precision: bf16"
            )
    elif stage.training.precision != "fp32":
        ctx.logger.warning("precision %s is for GPUs; training in fp32 on CPU", stage.training.precision)


def _job(ctx: StageContext, stage: FinetuneStage) -> MegatronJob:
    from forgeline_operators.data import pad_token_id
    from forgeline_operators.finetune.megatron import engine, loop
    from forgeline_operators.finetune.megatron.model import check_layout, shape_from_hf
    from forgeline_operators.finetune.operator import _features, schedule
    from forgeline_operators.lib.hf_checkpoint import load_tokenizer

    base_dir = ctx.input_path(stage.base)
    if (base_dir / "adapter_config.json").is_file():
        raise OperatorError(
            f"backend megatron imports a full HF checkpoint, but {stage.base} is an adapter; use merged"
        )
    shape = shape_from_hf(json.loads((base_dir / "config.json").read_text()))
    par = stage.parallelism
    check_layout(shape, par.tp, par.pp)
    tokenizer = load_tokenizer(base_dir)
    feats = _features(ctx, stage, tokenizer)
    t = stage.training
    sched = schedule(stage, len(feats.train))
    gpu = str(ctx.workflow.resources.device) == "gpu"
    settings = engine.Settings(
        tp=par.tp,
        pp=par.pp,
        lr=t.lr,
        total_steps=sched.total_steps,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        seed=t.seed,
        warmup_steps=int(t.warmup_ratio * sched.total_steps),
        lr_scheduler=t.lr_scheduler,
        weight_decay=t.weight_decay,
        lora=(stage.lora or _default_lora()) if stage.uses_adapter else None,
        precision="bf16" if gpu and t.precision == "bf16" else "fp32",
        recompute=t.gradient_checkpointing,
    )
    datasets = {n: ctx.dataset(n).sha256 for n in filter(None, (stage.dataset, stage.eval_dataset))}
    identity = {"stage": stage.model_dump(mode="json"), "base": str(base_dir), **datasets}
    root = durable_dir(ctx.output_dir, identity)
    root.mkdir(parents=True, exist_ok=True)
    removed = discard_incomplete(root)
    if removed:
        ctx.logger.warning("discarded incomplete checkpoints %s", ", ".join(removed))
    r = loop.Run(
        settings=settings,
        shape=shape,
        hf_dir=base_dir,
        train=feats.train,
        eval=feats.eval,
        pad_id=pad_token_id(tokenizer),
        steps=sched.total_steps,
        checkpoint_root=root,
        save_every=sched.save_steps,
        resume_from=latest_complete(root),
        export_dir=ctx.output_dir,
        checkpoint_info={"method": stage.method, "rendering": feats.rendering},
        dpo_beta=(stage.dpo.beta if stage.dpo else 0.1) if stage.method == "dpo" else None,
        reference_dir=ctx.input_path(stage.dpo.reference) if stage.dpo and stage.dpo.reference else None,
    )
    threads = max(1, int(_cpus_per_worker(ctx, stage))) if par.world_size > 1 else ctx.threads
    return MegatronJob(
        r, par.dp, threads, MetricsTarget(ctx.tracking_uri, ctx.run_id), ctx.work_dir / "outcome.json"
    )


def _default_lora() -> Any:
    from forgeline_operators.finetune.spec import LoraSpec

    return LoraSpec()


def _cpus_per_worker(ctx: StageContext, stage: FinetuneStage) -> float:
    if stage.resources and stage.resources.cpus:
        return float(stage.resources.cpus)
    return float(ctx.workflow.resources.cpus_per_stage)


def worker(job: MegatronJob) -> None:
    """One rank: megatron groups over the existing process group, train, rank 0 writes the outcome."""
    import torch

    from forgeline_operators.finetune.megatron import loop
    from forgeline_operators.finetune.megatron.engine import init_parallel

    os.environ["OMP_NUM_THREADS"] = str(job.threads)
    torch.set_num_threads(job.threads)
    s = job.run.settings
    init_parallel(s.tp, s.pp, s.seed)
    rank0 = torch.distributed.get_rank() == 0
    sink = None
    if rank0 and job.metrics.tracking_uri and job.metrics.run_id:
        from forgeline.tracking import RunSink, Tracker

        run_sink = RunSink(Tracker(job.metrics.tracking_uri), job.metrics.run_id)
        sink = run_sink.log_metrics
    result = loop.run(job.run, sink)
    if rank0:
        outcome = _outcome(result)
        write_text_atomic(job.outcome_path, json.dumps(asdict(outcome)))


def _outcome(result: Any) -> TrainOutcome:
    h = result.history
    metrics: dict[str, float] = {"steps": float(h[-1]["step"]) if h else float(result.resumed_from_step)}
    if h:
        metrics.update(
            first_loss=h[0]["loss"],
            final_loss=h[-1]["loss"],
            train_loss=sum(x["loss"] for x in h) / len(h),
            grad_norm=h[-1]["grad_norm"],
            tokens_per_second=sum(x["tokens_per_second"] for x in h) / len(h),
        )
    if result.eval_loss is not None:
        metrics["eval_loss"] = result.eval_loss
    headline = metrics.get("eval_loss", metrics.get("final_loss"))
    if headline is not None:
        metrics["loss"] = headline
    metrics["peak_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return TrainOutcome(
        metrics=metrics, resumed_from_step=result.resumed_from_step, outputs=result.outputs, history=h
    )


def _in_process(job: MegatronJob) -> None:
    import torch

    from forgeline_operators.ports import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        worker(job)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _ray_loop(config: dict[str, Any]) -> None:
    worker(config["job"])


def _on_ray_train(ctx: StageContext, stage: FinetuneStage, job: MegatronJob) -> None:
    from forgeline_operators.finetune._ray_train import DataParallel, run_on_workers
    from forgeline_operators.finetune.operator import PLACEMENT_TIMEOUT_S

    gpu = str(ctx.workflow.resources.device) == "gpu"
    layout = DataParallel(job.world_size, _cpus_per_worker(ctx, stage), gpu, PLACEMENT_TIMEOUT_S)
    run_on_workers(_ray_loop, {"job": job}, layout, ctx.work_dir / "ray-train", stage.name)


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    assert isinstance(stage, FinetuneStage)
    _check(ctx, stage)
    job = _job(ctx, stage)
    r = job.run
    ctx.log_params(
        {
            "train_rows": len(r.train),
            "eval_rows": len(r.eval),
            "rendering": r.checkpoint_info["rendering"],
            "total_steps": r.steps,
            "save_steps": r.save_every,
            "world_size": job.world_size,
            "global_batch": r.settings.micro_batch_size * r.settings.grad_accum * job.dp,
        }
    )
    if job.world_size == 1:
        _in_process(job)
    else:
        _on_ray_train(ctx, stage, job)
    outcome = TrainOutcome(**json.loads(job.outcome_path.read_text()))
    if r.checkpoint_root is not None:
        shutil.rmtree(r.checkpoint_root, ignore_errors=True)  # outputs are HF; megatron shards are not kept
    metrics = {**outcome.metrics, "resumed_from_step": float(outcome.resumed_from_step)}
    ctx.log_metrics({k: v for k, v in metrics.items() if k != "loss"}, step=int(metrics["steps"]))
    from forgeline_operators.evaluate.general import after_finetune

    metrics.update(after_finetune(ctx, [ctx.output_dir / name for name in outcome.outputs]))
    return StageResult(outputs={name: ctx.output_dir / name for name in outcome.outputs}, metrics=metrics)
