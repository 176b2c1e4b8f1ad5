"""A ``tp * pp * dp`` gloo world of forked local processes (tests and the benchmark).

The operator uses Ray Train workers instead (:mod:`.operator`); this is the cheap way to run a layout
from one test process: children are forked from a parent that has already imported torch and
megatron-core (no per-rank import cost, ~1 s per layout instead of a 6-12 s torchrun start), each
initialises the default process group and megatron's parallel groups, runs ``fn(rank)`` and sends
back its result or its traceback. Every wait has a deadline.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

from forgeline_operators.ports import free_port

__all__ = ["run_world"]


def _child(
    rank: int, world: int, port: int, tp: int, pp: int, seed: int, fn: Callable[[int], Any], q: Any
) -> None:
    try:
        import torch

        torch.set_num_threads(1)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
        )
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        from forgeline_operators.finetune.megatron.engine import init_parallel

        init_parallel(tp, pp, seed)
        # plain pickle: tensors by value (torch's queue reducers pass file descriptors that die with us)
        q.put((rank, "ok", pickle.dumps(fn(rank))))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def run_world(
    world: int, tp: int, pp: int, fn: Callable[[int], Any], *, seed: int = 0, timeout_s: float = 300
) -> list[Any]:
    """Run ``fn(rank)`` on every rank of a fresh world; results in rank order."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, tp, pp, seed, fn, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = q.get(timeout=timeout_s)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]
