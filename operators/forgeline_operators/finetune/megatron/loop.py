"""The training loop every rank runs: set up, resume, step, checkpoint, export.

Shared by the operator's Ray Train workers, the parity tests and the benchmark, so what is tested
is what runs. Rank 0 logs step metrics (loss, grad norm, lr, tokens/s) to the sink and, at the end,
writes the HF checkpoint (and the PEFT adapter for LoRA) from the pieces every rank sends it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgeline_operators.data import IGNORE_INDEX
from forgeline_operators.finetune.megatron import _batches, ckpt, engine
from forgeline_operators.finetune.megatron.model import LlamaShape
from forgeline_operators.lib.train_rows import Feature

__all__ = ["Run", "RunResult", "run"]


@dataclass(frozen=True)
class Run:
    settings: engine.Settings
    shape: LlamaShape
    hf_dir: Path
    train: list[Feature]
    pad_id: int
    steps: int  # train until session.step reaches this
    eval: list[Feature] = field(default_factory=list)
    checkpoint_root: Path | None = None
    save_every: int = 0  # 0: never
    resume_from: Path | None = None
    export_dir: Path | None = None  # rank 0 writes merged/ (+ adapter/) here
    export_base: Path | None = None  # config/tokenizer source for the export (default hf_dir)
    checkpoint_info: dict[str, Any] = field(default_factory=dict)
    dpo_beta: float | None = None  # set: method dpo (features are preference pairs)
    reference_dir: Path | None = None  # dpo: explicit reference model (default: the starting model)


@dataclass
class RunResult:
    history: list[dict[str, float]]
    resumed_from_step: int = 0
    eval_loss: float | None = None
    outputs: list[str] = field(default_factory=list)


def _dp() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()


def _eval(session: engine.Session, r: Run, length: int) -> float | None:
    if not r.eval:
        return None
    dp, dp_rank = _dp()
    mbs = r.settings.micro_batch_size
    # pad the eval set by repeating rows, so every rank runs the same number of micro-batches
    per_rank = -(-len(r.eval) // (mbs * dp)) * mbs
    rows = [r.eval[i % len(r.eval)] for i in range(per_rank * dp)][
        dp_rank * per_rank : (dp_rank + 1) * per_rank
    ]
    # repeated rows carry no labels, so each held-out row counts exactly once
    first = dp_rank * per_rank
    rows = [
        row if first + j < len(r.eval) else {**row, "labels": [IGNORE_INDEX] * len(row["labels"])}
        for j, row in enumerate(rows)
    ]
    batches = [_batches.batch_tensors(rows[k : k + mbs], length, r.pad_id) for k in range(0, per_rank, mbs)]
    return engine.eval_loss(session, batches, length)


def run(r: Run, sink: Callable[[dict[str, float], int], None] | None = None) -> RunResult:
    """Train this rank; the process group and model-parallel groups are already initialised."""
    from forgeline_operators.finetune.megatron import dpo

    s = r.settings
    session = engine.setup(s, r.hf_dir, r.shape)
    reference = dpo.build_reference(session, r.hf_dir, r.reference_dir) if r.dpo_beta is not None else None
    resumed = 0
    if r.resume_from is not None:
        ckpt.load(session, r.resume_from)
        resumed = session.step
    length = (dpo.seq_len if r.dpo_beta is not None else _batches.seq_len)(r.train + r.eval)
    make_batches = dpo.micro_batches if r.dpo_beta is not None else _batches.micro_batches
    dp, dp_rank = _dp()
    history: list[dict[str, float]] = []
    while session.step < r.steps:
        # tokens/s counts the step's wall time from its batches being built, as the hf backend's
        # clock (log to log) includes its collator
        start = time.perf_counter()
        batches = make_batches(
            r.train,
            session.step,
            micro_batch_size=s.micro_batch_size,
            grad_accum=s.grad_accum,
            dp=dp,
            dp_rank=dp_rank,
            seed=s.seed,
            length=length,
            pad_id=r.pad_id,
            pad_to_longest=True,  # this step's longest sequence, as the hf backend's collator pads
        )
        width = int(batches[0]["tokens"].shape[1])
        lr = float(session.optimizer.param_groups[0]["lr"])
        if r.dpo_beta is not None:
            result = dpo.train_step(session, reference, r.dpo_beta, batches, width)
        else:
            result = engine.train_step(session, batches, width)
        elapsed = time.perf_counter() - start
        tokens = int(sum(int((b["tokens"] != r.pad_id).sum()) for b in batches)) * dp
        row = {
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "learning_rate": lr,
            "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
            "step": float(session.step),
        }
        if result.accuracy is not None:
            row["rewards_accuracy"] = result.accuracy
        history.append(row)
        if sink is not None and torch.distributed.get_rank() == 0:
            sink({k: v for k, v in row.items() if k != "step"}, session.step)
        if (
            r.checkpoint_root is not None
            and r.save_every
            and (session.step % r.save_every == 0 or session.step == r.steps)
        ):
            ckpt.save(session, r.checkpoint_root, r.checkpoint_info)
    result_eval = _eval(session, r, length) if r.dpo_beta is None else None
    outputs: list[str] = []
    if r.export_dir is not None:
        from forgeline_operators.finetune.megatron import export

        outputs = export.export(session, r.export_base or r.hf_dir, r.export_dir)
    return RunResult(history=history, resumed_from_step=resumed, eval_loss=result_eval, outputs=outputs)
