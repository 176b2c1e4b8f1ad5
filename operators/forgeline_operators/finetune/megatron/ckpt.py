"""Resumable megatron checkpoints with ``dist_checkpointing`` (save at one layout, load at another).

A checkpoint is ``<root>/checkpoint-<step>/`` holding the sharded model + optimizer state (every rank
writes its own shards; the metadata lets any TP/PP layout read them back) and the step, LR schedule
and data position as common state; it becomes resumable only when rank 0 marks it complete after a
barrier (:func:`forgeline_operators.finetune._checkpoints.mark_complete`, an fsynced rename), so a
crash mid-save never leaves something that looks finished. ``psutil`` must be installed, or saving
hangs (FACTS.md). megatron's file writer collects its forked writers' results through a
*spawn*-context ``Manager`` queue: spawning re-imports ``__main__`` (seconds per rank, and a script
without a main guard re-runs itself -- FACTS.md's "save must run under ``if __name__ ==
'__main__'``"); :func:`_fork_results_queue` hands it the same queue from a forked manager instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from forgeline_operators.finetune._checkpoints import mark_complete
from forgeline_operators.finetune.megatron import _cpu_compat
from forgeline_operators.finetune.megatron.engine import Session

__all__ = ["load", "save"]


_queue: Any = None


def _fork_results_queue() -> Any:
    global _queue
    if _queue is None:
        import multiprocessing as mp

        _queue = mp.get_context("fork").Manager().Queue()
    return _queue


def _use_fork_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue = _fork_results_queue


def _sharded(session: Session, loading: bool) -> dict[str, Any]:
    model_sd = session.module.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": session.optimizer.sharded_state_dict(model_sd, is_loading=loading),
        "scheduler": session.scheduler.state_dict(),
        "step": session.step,
    }


def save(session: Session, root: Path, info: dict[str, Any]) -> Path:
    from megatron.core import dist_checkpointing

    path = root / f"checkpoint-{session.step}"
    _use_fork_queue()
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    with _cpu_compat.cpu_mode():
        dist_checkpointing.save(_sharded(session, loading=False), str(path))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        s = session.settings
        mark_complete(path, {**info, "tp": s.tp, "pp": s.pp, "format": "megatron-dist-checkpoint"})
    torch.distributed.barrier()
    return path


def load(session: Session, path: Path) -> None:
    """Restore model, optimizer, schedule and step in place (any layout)."""
    from megatron.core import dist_checkpointing

    with _cpu_compat.cpu_mode():
        state = dist_checkpointing.load(_sharded(session, loading=True), str(path))
        session.module.load_state_dict(state["model"], strict=False)
        session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    session.step = int(state["step"])
