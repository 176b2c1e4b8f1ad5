"""Functions ``sft.py`` and ``dpo.py`` share: loading models, Trainer arguments, callbacks, outputs.

Models load in fp32 on CPU (bf16/fp16 only on GPU when asked), QLoRA bases through bitsandbytes NF4
(+ double quantization) and ``prepare_model_for_kbit_training``. Step metrics reach the stage's
MetricSink from the Trainer's ``on_log`` (one sink call per logging step, all metrics of the step in
it), checkpoints are marked complete from ``on_save``. Outputs are written by the world's rank 0: the
adapter (PEFT layout + tokenizer) and the merged checkpoint, which is always re-made from the
*unquantized* base plus the saved adapter, so ``merged`` equals adapter-on-base by construction.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from forgeline.runtime.context import MetricSink, OperatorError
from forgeline_operators.finetune._checkpoints import (
    discard_incomplete,
    latest_complete,
    mark_complete,
    step_of,
)
from forgeline_operators.finetune._job import TrainJob, TrainOutcome
from forgeline_operators.finetune.spec import LoraSpec, QLoraSpec
from forgeline_operators.lib.hf_checkpoint import adapter_base_dir, load_causal_lm

__all__ = [
    "MetricsCallback",
    "common_args",
    "finish",
    "is_rank0",
    "load_model",
    "load_policy",
    "lora_config",
    "prepare_resume",
    "save_outputs",
    "setup_process",
]

log = logging.getLogger("forgeline.finetune")

# Trainer log keys worth a metric (trl adds rewards/*, logps/*, mean_token_accuracy, entropy, ...).
_SKIP_KEYS = {"total_flos", "num_input_tokens_seen", "train_tokens_per_second"}


def setup_process(job: TrainJob) -> None:
    """Threads and seeds, set explicitly: on 2 busy cores 1 thread beats 2 by 10x (FACTS.md)."""
    from transformers import set_seed

    os.environ["OMP_NUM_THREADS"] = str(job.threads)
    torch.set_num_threads(job.threads)
    set_seed(job.stage.training.seed)


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _dtype(job: TrainJob) -> torch.dtype:
    precision = job.stage.training.precision
    if job.device == "gpu" and precision == "bf16":
        return torch.bfloat16
    if job.device == "gpu" and precision == "fp16":
        return torch.float16
    return torch.float32


def load_model(job: TrainJob, model_dir: Path) -> Any:
    """A full causal LM from a checkpoint, or from an adapter directory merged into its base in memory."""
    return load_causal_lm(model_dir, _dtype(job))


def load_policy(job: TrainJob) -> tuple[Any, Any]:
    """The model to train and the LoRA config for the trainer to apply (None: nothing to add).

    An adapter method starting from an adapter directory keeps training that adapter (on its own
    base); a full method starting from one trains the merged model. QLoRA quantizes a full checkpoint.
    """
    base = adapter_base_dir(job.base_dir)
    if job.stage.method == "qlora":
        if base is not None:
            raise OperatorError(
                f"qlora quantizes a full checkpoint, but {job.base_dir} is an adapter; use the merged output"
            )
        return _load_quantized(job, job.base_dir), lora_config(job)
    if base is not None and job.adapter:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=_dtype(job))
        if job.stage.lora is not None:
            log.info("continuing the adapter in %s; its own LoRA settings apply", job.base_dir)
        return PeftModel.from_pretrained(model, str(job.base_dir), is_trainable=True), None
    model = load_model(job, job.base_dir)
    return model, (lora_config(job) if job.adapter else None)


def _load_quantized(job: TrainJob, model_dir: Path) -> Any:
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    q = job.stage.qlora or QLoraSpec()
    dtype = _dtype(job)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, quantization_config=config, device_map={"": _local_device(job)}
    )
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=job.stage.training.gradient_checkpointing
    )


def _local_device(job: TrainJob) -> str:
    if job.device != "gpu":
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def lora_config(job: TrainJob) -> Any:
    from peft import LoraConfig

    lora = job.stage.lora or LoraSpec()
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int; peft scales by alpha / r
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def common_args(job: TrainJob) -> dict[str, Any]:
    """TrainingArguments shared by SFTConfig and DPOConfig."""
    t = job.stage.training
    gpu = job.device == "gpu"
    has_eval = bool(job.features.eval)
    return {
        "output_dir": str(job.checkpoint_dir),
        "per_device_train_batch_size": t.micro_batch_size,
        "per_device_eval_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.lr,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        "weight_decay": t.weight_decay,
        "num_train_epochs": t.epochs,
        "max_steps": job.schedule.total_steps,
        "seed": t.seed,
        "data_seed": t.seed,
        "bf16": gpu and t.precision == "bf16",
        "fp16": gpu and t.precision == "fp16",
        "use_cpu": not gpu,
        "gradient_checkpointing": t.gradient_checkpointing,
        "logging_steps": job.schedule.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": job.schedule.save_steps,
        "save_total_limit": 2,  # the newest may be half written when a crash hits; keep the one before
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": job.schedule.save_steps if has_eval else None,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
        "ddp_backend": ("nccl" if gpu else "gloo") if job.world_size > 1 else None,
        "max_length": t.max_seq_len,
    }


def prepare_resume(job: TrainJob) -> Path | None:
    """The last complete checkpoint of this stage (half-written ones removed), or None."""
    if is_rank0():
        removed = discard_incomplete(job.checkpoint_dir)
        if removed:
            log.warning("discarded incomplete checkpoints %s", ", ".join(removed))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    last = latest_complete(job.checkpoint_dir)
    if last is not None:
        log.info("resuming from %s (step %d)", last, step_of(last))
    return last


class MetricsCallback(TrainerCallback):
    """Step metrics to the sink (rank 0) with tokens/s; marks finished checkpoints resumable."""

    def __init__(self, sink: MetricSink | None, job: TrainJob) -> None:
        self.sink = sink
        self.job = job
        self.history: list[dict[str, float]] = []
        self._last_time = time.perf_counter()
        self._last_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restart_clock(state)

    def _restart_clock(self, state: Any) -> None:
        # tokens/s measures training only: evaluation and checkpoint writes restart the clock.
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restart_clock(state)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        metrics = {
            k: float(v)
            for k, v in logs.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in _SKIP_KEYS
        }
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        if "loss" in metrics and now > self._last_time and tokens > self._last_tokens:
            metrics["tokens_per_second"] = (tokens - self._last_tokens) / (now - self._last_time)
            self._last_time, self._last_tokens = now, tokens
        if not metrics:
            return
        self.history.append({**metrics, "step": float(state.global_step)})
        if self.sink is not None:
            self.sink.log_metrics(metrics, step=state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark_complete(checkpoint, {"world_size": self.job.world_size, "method": self.job.stage.method})
        self._restart_clock(state)


def save_outputs(job: TrainJob, model: Any, tokenizer: Any) -> list[str]:
    """Rank 0 writes ``adapter/`` (adapter methods) and ``merged/``; returns the names written."""
    written: list[str] = []
    if job.adapter:
        adapter = job.output_dir / "adapter"
        model.save_pretrained(str(adapter))
        tokenizer.save_pretrained(str(adapter))
        _set_adapter_base(adapter, _trained_base(job))
        written.append("adapter")
        if job.merge:
            merge_adapter(_trained_base(job), adapter, job.output_dir / "merged", tokenizer, _dtype(job))
            written.append("merged")
    else:
        merged = job.output_dir / "merged"
        if job.stage.qat is not None:
            from forgeline_operators.lib.modelopt_ptq import export_hf

            model.eval()
            export_hf(model, merged, job.stage.qat.export_dtype)  # the quantize stage's export
        else:
            model.save_pretrained(str(merged))
        tokenizer.save_pretrained(str(merged))
        written.append("merged")
    return written


def _trained_base(job: TrainJob) -> Path:
    """The full checkpoint the adapter sits on (an adapter base is followed to its own base)."""
    return adapter_base_dir(job.base_dir) or job.base_dir


def _set_adapter_base(adapter: Path, base: Path) -> None:
    # PEFT records config._name_or_path; make it the checkpoint the adapter really applies to.
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_adapter(base: Path, adapter: Path, dest: Path, tokenizer: Any, dtype: torch.dtype) -> None:
    """Unquantized base + adapter, ``merge_and_unload``, saved as a plain HF checkpoint."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))


def finish(
    job: TrainJob,
    trainer: Any,
    result: Any,
    resumed: Path | None,
    callback: MetricsCallback,
    tokenizer: Any,
) -> TrainOutcome:
    """Final eval, outputs from rank 0, and the outcome every rank returns (rank 0's is used)."""
    metrics: dict[str, float] = {
        "train_loss": float(result.training_loss),
        "steps": float(result.global_step),
    }
    if job.features.eval:
        for name, value in trainer.evaluate().items():
            if isinstance(value, int | float):
                metrics[name] = float(value)
    losses = [h["loss"] for h in callback.history if "loss" in h]
    if losses:
        metrics["first_loss"], metrics["final_loss"] = losses[0], losses[-1]
    # The stage's headline number: held-out loss when there is an eval set, else the last train loss.
    headline = metrics.get("eval_loss", metrics.get("final_loss"))
    if headline is not None:
        metrics["loss"] = headline
    speeds = [h["tokens_per_second"] for h in callback.history if "tokens_per_second" in h]
    if speeds:
        metrics["tokens_per_second"] = sum(speeds) / len(speeds)
    model = trainer.accelerator.unwrap_model(trainer.model)
    metrics["trainable_params"] = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    if job.stage.method == "qlora":
        from bitsandbytes.nn import Linear4bit

        metrics["quantized_layers"] = float(sum(isinstance(m, Linear4bit) for m in model.modules()))
    # Peak resident memory of this process (a worker's own on Ray Train), to check plan's estimate.
    metrics["peak_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    outputs: list[str] = []
    if is_rank0():
        outputs = save_outputs(job, model, tokenizer)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return TrainOutcome(
        metrics=metrics,
        resumed_from_step=step_of(resumed) if resumed else 0,
        outputs=outputs,
        history=callback.history,
    )
