"""DPO on the megatron backend: policy + frozen reference, sigmoid loss with ``beta``, any TP/PP/DP.

Rows are the hf backend's preference features (``prompt_ids``/``chosen_ids``/``rejected_ids`` from
:func:`forgeline_operators.finetune.dpo.features`). A micro-batch of ``m`` pairs is ``2m`` sequences
(chosen rows, then rejected rows) with the loss mask on completion tokens; a sequence's log-prob is
minus its masked token cross-entropy summed. Per optimizer step the reference log-probs are computed
once (a forward-only pass of the same pipeline schedule on the reference: a frozen copy for full DPO,
the policy with its adapters switched off for LoRA) and handed to the training pass's loss on the
last stage. The loss is ``-logsigmoid(beta * ((pc - rc) - (pr - rr)))`` summed over pairs and divided
by the global pair count (:func:`.engine.loss_scale` with one "token" per pair).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from forgeline_operators.data import IGNORE_INDEX
from forgeline_operators.finetune.megatron import _batches, _cpu_compat
from forgeline_operators.finetune.megatron.engine import Session, StepResult, global_sums, loss_scale
from forgeline_operators.lib.train_rows import Feature

__all__ = ["build_reference", "micro_batches", "seq_len", "train_step"]


def seq_len(features: Sequence[Feature]) -> int:
    return max(len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features)


def _rows(pairs: Sequence[Feature]) -> list[Feature]:
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for f in pairs:
            ids = f["prompt_ids"] + f[side]
            out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(f["prompt_ids"]) + f[side]})
    return out


def micro_batches(features: Sequence[Feature], step: int, **layout: Any) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of ``micro_batch_size`` pairs each (``2 x`` that many sequences)."""
    return _batches.micro_batches(features, step, sequences=_rows, **layout)


def build_reference(session: Session, base_dir: Path, reference_dir: Path | None) -> Any:
    """A frozen reference stage for full DPO (None for LoRA: the policy with adapters off)."""
    if session.settings.lora is not None and reference_dir is None:
        return None
    from megatron.core import parallel_state

    from forgeline_operators.finetune.megatron import convert
    from forgeline_operators.finetune.megatron.engine import layer_offset
    from forgeline_operators.finetune.megatron.model import build_model, transformer_config

    s = session.settings
    config = transformer_config(session.shape, s.tp, s.pp, s.dtype)
    with _cpu_compat.cpu_mode():
        ref = build_model(session.shape, config)
    weights = convert.hf_to_local(
        convert.load_hf_state(reference_dir or base_dir),
        session.shape,
        list(ref.state_dict()),
        parallel_state.get_tensor_model_parallel_rank(),
        s.tp,
        layer_offset(session.shape, s.pp),
    )
    ref.load_state_dict(weights, strict=False)
    ref.requires_grad_(False)
    if s.precision == "bf16":
        from megatron.core.transformer.module import Float16Module

        ref = Float16Module(config, ref)  # the policy's input/output conversion, in bf16 like it
    return ref.eval()


def _logps(loss_mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return -(output.float() * loss_mask).sum(dim=-1)  # [2m]: chosen rows, then rejected rows


def _ref_loss(loss_mask: torch.Tensor, output: torch.Tensor) -> tuple[Any, Any, Any]:
    logps = _logps(loss_mask, output).detach()
    return logps.sum() * 0, torch.tensor(0, dtype=torch.int), {"ref_logps": logps}


def _dpo_loss(
    beta: float, scale: float, batch: dict[str, torch.Tensor], output: torch.Tensor
) -> tuple[Any, Any]:
    logps = _logps(batch["loss_mask"], output)
    ref = batch["ref_logps"]
    m = logps.shape[0] // 2
    margin = (logps[:m] - ref[:m]) - (logps[m:] - ref[m:])
    losses = -torch.nn.functional.logsigmoid(beta * margin)
    total = losses.sum()
    correct = (margin.detach() > 0).float().sum()
    return (
        total * scale,
        {"sum_count": torch.stack([total.detach(), torch.tensor(float(m))]), "correct": correct},
    )


def _step_fn(loss: Callable[..., Any], ref: bool) -> Callable[..., Any]:
    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any) -> tuple[Any, Any]:
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss, batch["loss_mask"]) if ref else partial(loss, batch)

    return forward_step


def train_step(
    session: Session, reference: Any, beta: float, mbs: list[dict[str, torch.Tensor]], length: int
) -> StepResult:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from forgeline_operators.finetune.megatron import lora

    run = get_forward_backward_func()
    common = {
        "num_microbatches": len(mbs),
        "seq_length": length,
        "micro_batch_size": 2 * session.settings.micro_batch_size,
    }
    ref_model = reference if reference is not None else session.model
    adapters_off = lora.disabled(session.adapters) if reference is None else contextlib.nullcontext()
    with _cpu_compat.cpu_mode(), torch.no_grad(), adapters_off:
        ref_out = run(
            forward_step_func=_step_fn(_ref_loss, True),
            data_iterator=iter(mbs),
            model=[ref_model],
            forward_only=True,
            **common,
        )
    if parallel_state.is_pipeline_last_stage():
        for mb, out in zip(mbs, ref_out, strict=True):
            mb["ref_logps"] = out["ref_logps"]
    # every sequence pair counts once: the global pair count is known without communication
    pairs = session.settings.micro_batch_size * len(mbs) * parallel_state.get_data_parallel_world_size()
    scale = loss_scale(float(pairs), len(mbs))
    with _cpu_compat.cpu_mode():
        _cpu_compat.zero_grad_buffer(session.model)
        session.optimizer.zero_grad()
        reduced = run(
            forward_step_func=_step_fn(partial(_dpo_loss, beta, scale), False),
            data_iterator=iter(mbs),
            model=[session.model],
            forward_only=False,
            **common,
        )
        _, grad_norm, _ = session.optimizer.step()
    session.scheduler.step(increment=1)
    session.step += 1
    loss_sum, pairs, correct = global_sums(reduced, extra="correct")
    return StepResult(
        loss=loss_sum / max(pairs, 1.0),
        grad_norm=float(grad_norm or 0.0),
        tokens=int(pairs),
        accuracy=correct / max(pairs, 1.0),
    )
