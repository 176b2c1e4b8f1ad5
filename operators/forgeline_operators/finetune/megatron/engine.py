"""One training process of the megatron backend: model parallel groups, model, optimizer, steps, I/O.

Every rank of a ``tp * pp * dp`` world runs the same calls; ``torch.distributed`` is already up
(Ray Train's gloo/NCCL group, or a test's). :func:`setup` builds this rank's pipeline stage from an
HF checkpoint (LoRA adapters attached before the megatron ``DistributedDataParallel`` wrapper, so
only trainable tensors get gradient buffers), the megatron optimizer (regular Adam: FACTS.md notes
the distributed optimizer's resume is wrong on CPU in 0.16.1) and the LR schedule. :func:`train_step`
runs one optimizer step through ``get_forward_backward_func`` (1F1B under pp > 1) with the loss
summed over completion tokens and divided by their global count (counted before the step, see
:func:`loss_scale`), so every layout computes the same number. Checkpoints are
``dist_checkpointing`` (resharding load).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from forgeline_operators.finetune.megatron import _cpu_compat
from forgeline_operators.finetune.megatron.model import LlamaShape
from forgeline_operators.finetune.spec import LoraSpec

__all__ = ["Session", "Settings", "StepResult", "global_sums", "init_parallel", "setup", "train_step"]


@dataclass(frozen=True)
class Settings:
    """Everything a rank needs to build the same run as every other rank."""

    tp: int
    pp: int
    lr: float
    total_steps: int
    micro_batch_size: int
    grad_accum: int
    seed: int = 0
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"  # constant | linear | cosine
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    lora: LoraSpec | None = None
    precision: str = "fp32"  # fp32 | bf16 (bf16 weights and activations, fp32 main params and grads)
    recompute: bool = False  # full activation recompute, one layer per checkpoint

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


@dataclass
class Session:
    settings: Settings
    shape: LlamaShape
    config: Any
    model: Any  # megatron DistributedDataParallel around this rank's GPTModel stage
    optimizer: Any
    scheduler: Any
    step: int = 0
    adapters: dict[str, Any] = field(default_factory=dict)  # LoRA modules by megatron module path

    @property
    def module(self) -> Any:
        """This rank's ``GPTModel`` stage (inside megatron's ``Float16Module`` under bf16)."""
        inner = self.model.module
        return inner.module if _is_float16_module(inner) else inner

    def main_params(self) -> dict[int, torch.Tensor]:
        """fp32 main copy by ``id`` of each bf16 model parameter the optimizer trains (empty in fp32)."""
        out: dict[int, torch.Tensor] = {}
        for chained in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for model_group, main_group in zip(
                getattr(chained, "float16_groups", []),
                getattr(chained, "fp32_from_float16_groups", []),
                strict=True,
            ):
                for model_param, main_param in zip(model_group, main_group, strict=True):
                    out[id(model_param)] = main_param
        return out


def _is_float16_module(module: Any) -> bool:
    from megatron.core.transformer.module import Float16Module

    return isinstance(module, Float16Module)


@dataclass(frozen=True)
class StepResult:
    loss: float  # completion-token mean over the global batch (same on every rank)
    grad_norm: float
    tokens: int  # completion tokens (sft) or preference pairs (dpo) in the global batch
    accuracy: float | None = None  # dpo: share of pairs whose implicit reward prefers chosen


def init_parallel(tp: int, pp: int, seed: int) -> None:
    """Megatron's TP/PP/DP groups over the already initialised default process group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    _cpu_compat.apply()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)


def layer_offset(shape: LlamaShape, pp: int) -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank() * (shape.num_layers // pp)


def setup(settings: Settings, hf_dir: Path, shape: LlamaShape) -> Session:
    """This rank's model (weights from ``hf_dir``), optimizer and schedule."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from forgeline_operators.finetune.megatron import convert, lora
    from forgeline_operators.finetune.megatron.model import build_model, transformer_config

    if settings.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {settings.precision!r}: the megatron backend trains fp32 or bf16")
    config = transformer_config(shape, settings.tp, settings.pp, settings.dtype, settings.recompute)
    with _cpu_compat.cpu_mode():
        module = build_model(shape, config)
    hf = convert.load_hf_state(hf_dir)
    weights = convert.hf_to_local(
        hf,
        shape,
        list(module.state_dict()),
        parallel_state.get_tensor_model_parallel_rank(),
        settings.tp,
        layer_offset(shape, settings.pp),
    )
    missing, unexpected = module.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"HF import left megatron keys unset {missing} or unused {unexpected}")
    adapters: dict[str, Any] = {}
    if settings.lora is not None:
        adapters = lora.attach(module, settings.lora, shape, settings.seed, layer_offset(shape, settings.pp))
        if settings.recompute and parallel_state.is_pipeline_first_stage():
            # megatron's recompute is a reentrant autograd Function over the layer inputs: with a
            # frozen embedding nothing it receives requires grad, so backward would skip every
            # layer and the adapters would get no gradient (measured: grad norm 0). Later pipeline
            # stages receive activations that require grad already.
            module.embedding.register_forward_hook(_inputs_require_grad)
    config.finalize_model_grads_func = _finalize_grads(finalize_model_grads)
    with _cpu_compat.cpu_mode():
        if settings.precision == "bf16":
            from megatron.core.transformer.module import Float16Module

            # megatron's mixed precision: every parameter (adapters too) in bf16, the first stage's
            # input and the last stage's output converted by the wrapper; the optimizer keeps fp32
            # main params and the DDP buffers reduce gradients in fp32
            module = Float16Module(config, module)
        ddp = DistributedDataParallel(
            config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
            ),
            module,
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=settings.lr,
                min_lr=settings.min_lr,
                weight_decay=settings.weight_decay,
                clip_grad=settings.clip_grad,
                params_dtype=settings.dtype,
                bf16=settings.precision == "bf16",
                use_distributed_optimizer=False,
            ),
            [ddp],
        )
    _fuse_adam(optimizer)
    style = {"cosine": "cosine", "linear": "linear", "constant": "constant"}[settings.lr_scheduler]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if settings.warmup_steps else settings.lr,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=max(1, settings.total_steps),
        lr_decay_style=style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=max(1, settings.total_steps),
        wd_incr_style="constant",
    )
    return Session(settings, shape, config, ddp, optimizer, scheduler, adapters=adapters)


def _inputs_require_grad(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True) if torch.is_grad_enabled() else output


def _finalize_grads(finalize: Callable[..., Any]) -> Callable[..., Any]:
    """megatron's gradient finalisation, after zeroing what the lazy buffer zeroing left unwritten."""

    def run(*args: Any, **kwargs: Any) -> Any:
        _cpu_compat.zero_unwritten()
        return finalize(*args, **kwargs)

    return run


def _fuse_adam(optimizer: Any) -> None:
    """Use torch's fused AdamW kernel (CPU and CUDA), as the hf backend's default optimizer does.

    Without TransformerEngine/apex megatron falls back to ``torch.optim.AdamW`` with its per-tensor
    loop, measured at ~25 % of a step on a 30M-param model on CPU; the fused kernel is the same math.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if isinstance(inner, torch.optim.AdamW):
            inner.defaults.update(fused=True, foreach=False)
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def _loss_func(loss_mask: torch.Tensor, scale: float, output: torch.Tensor) -> tuple[Any, Any]:
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(output.float().reshape(-1) * mask)
    return total * scale, {"sum_count": torch.stack([total.detach(), mask.sum()])}


def _forward_step(
    data_iterator: Iterator[dict[str, torch.Tensor]], model: Any, scale: float = 1.0
) -> tuple[Any, Callable[..., Any]]:
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"], scale)


def loss_scale(count: float, num_microbatches: int) -> float:
    """The factor that makes megatron's default averaging a global per-token mean.

    Megatron divides each micro-batch's loss by the micro-batch count and (DDP) each gradient by
    the data-parallel size; a loss of ``sum * num_microbatches * dp / count`` therefore yields the
    gradient of ``sum / count`` over the global batch, the per-token loss, without
    ``calculate_per_token_loss``'s extra pass over the whole gradient buffer after backward
    (measured at ~3 % of a step on the bench's ~30M model). ``count`` is the global number of loss
    tokens (pairs for DPO), known before the step.
    """
    from megatron.core import parallel_state

    return num_microbatches * parallel_state.get_data_parallel_world_size() / max(count, 1.0)


def global_count(micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """Loss tokens of the global batch: this rank's, summed over its data-parallel group."""
    from megatron.core import parallel_state

    local = torch.tensor([float(sum(float(mb["loss_mask"].sum()) for mb in micro_batches))])
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
    return float(local[0])


def train_step(session: Session, micro_batches: list[dict[str, torch.Tensor]], seq_len: int) -> StepResult:
    """One optimizer step over this rank's micro-batches (the same count on every rank)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    s = session.settings
    scale = loss_scale(global_count(micro_batches), len(micro_batches))
    with _cpu_compat.cpu_mode():
        _cpu_compat.zero_grad_buffer(session.model)
        session.optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, scale=scale),
            data_iterator=iter(micro_batches),
            model=[session.model],
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=s.micro_batch_size,
            forward_only=False,
        )
        _, grad_norm, _ = session.optimizer.step()
    session.scheduler.step(increment=1)
    session.step += 1
    loss_sum, count = global_sums(reduced)
    return StepResult(loss=loss_sum / max(count, 1.0), grad_norm=float(grad_norm or 0.0), tokens=int(count))


def global_sums(reduced: list[dict[str, torch.Tensor]], extra: str | None = None) -> tuple[float, ...]:
    """(loss sum, count[, sum of ``extra``]) of the global batch on every rank: each last-stage
    TP-rank-0 of a data-parallel replica contributes its share, every other rank zeros."""
    from megatron.core import parallel_state

    vec = torch.zeros(3, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        for item in reduced:
            vec[:2] += item["sum_count"].double()
            if extra is not None:
                vec[2] += float(item[extra])
    torch.distributed.all_reduce(vec)
    return tuple(float(v) for v in (vec if extra is not None else vec[:2]))


@contextlib.contextmanager
def _no_grad_eval(session: Session) -> Iterator[None]:
    session.model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        session.model.train()


def eval_loss(session: Session, micro_batches: list[dict[str, torch.Tensor]], seq_len: int) -> float:
    """Completion-token mean loss over the given batches (forward only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with _no_grad_eval(session), _cpu_compat.cpu_mode():
        reduced = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(micro_batches),
            model=[session.model],
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=session.settings.micro_batch_size,
            forward_only=True,
        )
    loss_sum, count = global_sums(reduced)
    return loss_sum / max(count, 1.0)
