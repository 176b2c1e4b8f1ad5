"""megatron backend throughput: TP=1 tokens/s vs the hf backend on the same model, data and batch,
and TP=2 / PP=2 / TP2xPP2 step times on this machine.

    PYTHONPATH=platform:operators python bench/finetune_parallel.py [--models tiny,small] [--steps 50]
        [--rounds 3] [--layouts 2x1,1x2,2x2]

Both backends train full SFT in fp32 with 1 thread per rank on the same tokenised rows
(``forgeline_operators.data``), micro batch 8, max_seq_len 64, for ``--steps`` optimizer steps; the hf
side is the real hf backend (``finetune.sft.train``: trl SFTTrainer), the megatron side the real
``megatron.loop.run`` on forked gloo ranks. tokens/s counts non-padding input tokens (both sides)
over the steps after the first two (warm-up), summed tokens over summed step times; with the
default 50 steps both backends train on every row of the 400-row data once (in their own orders).
hf and megatron TP=1 alternate for ``--rounds`` rounds and the ratio is the median of the per-round
ratios (this VM's speed drifts between minutes; each round also prints the CPU steal time).
``small`` is bench/finetune.py's ~30M-param random-weight Llama (throughput only). Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "workflows" / "data" / "chat_sft.jsonl"
MBS, SEQ = 8, 64


def _features(model_dir: Path) -> tuple[Any, int]:
    from forgeline_operators.data import pad_token_id
    from forgeline_operators.lib.hf_checkpoint import load_tokenizer
    from forgeline_operators.lib.train_rows import sft_features

    tok = load_tokenizer(model_dir)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    return sft_features(tok, rows, [], "sft", SEQ), pad_token_id(tok)


def _cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of this machine (Linux), to show how much a noisy VM host took."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def _median(values: list[float]) -> float:
    return statistics.median(values[2:] if len(values) > 3 else values)


def _aggregate(tokens: list[float], rates: list[float]) -> float:
    """Tokens over seconds of the steps after the first two (warm-up): each step weighs by its time,
    so batches of different lengths count as they cost."""
    pairs = [(t, r) for t, r in zip(tokens, rates, strict=True) if r > 0][2:]
    return sum(t for t, _ in pairs) / sum(t / r for t, r in pairs)


def hf_tokens_per_s(model_dir: Path, steps: int, work: Path) -> float:
    from forgeline_operators.finetune import sft
    from forgeline_operators.finetune._job import Schedule, TrainJob
    from forgeline_operators.finetune.spec import FinetuneStage

    feats, pad = _features(model_dir)
    stage = FinetuneStage.model_validate(
        {"name": "bench", "kind": "finetune", "method": "sft", "dataset": "d",
         "training": {"max_steps": steps, "micro_batch_size": MBS, "lr": 1e-4, "max_seq_len": SEQ}}
    )  # fmt: skip
    job = TrainJob(
        stage=stage, base_dir=model_dir, reference_dir=None, features=feats, pad_id=pad,
        checkpoint_dir=work / "hf-ckpt", output_dir=work / "hf-out", merge=False, device="cpu",
        world_size=1, threads=1, schedule=Schedule(total_steps=steps, logging_steps=1, save_steps=steps),
    )  # fmt: skip
    outcome = sft.train(job, None)
    rows = [h for h in outcome.history if "tokens_per_second" in h]
    seen = [0.0] + [h["num_tokens"] for h in rows]  # trl's cumulative non-padding input tokens
    return _aggregate([b - a for a, b in itertools.pairwise(seen)], [h["tokens_per_second"] for h in rows])


def megatron_run(model_dir: Path, steps: int, tp: int, pp: int) -> tuple[float, float]:
    """(tokens/s, median step seconds) at this layout."""
    from forgeline_operators.finetune.megatron import _batches, engine, launch, loop
    from forgeline_operators.finetune.megatron.model import shape_from_hf

    feats, pad = _features(model_dir)
    shape = shape_from_hf(json.loads((model_dir / "config.json").read_text()))
    settings = engine.Settings(tp=tp, pp=pp, lr=1e-4, total_steps=steps, micro_batch_size=MBS, grad_accum=1)
    run = loop.Run(
        settings=settings, shape=shape, hf_dir=model_dir, train=feats.train, pad_id=pad, steps=steps
    )

    def rank(_r: int) -> list[dict[str, float]]:
        return loop.run(run).history

    history = launch.run_world(tp * pp, tp, pp, rank, timeout_s=1200)[0]
    tokens = [  # each step's non-padding tokens, rebuilt as the loop built them (a pure function)
        float(sum(int((b["tokens"] != pad).sum()) for b in _batches.micro_batches(
            feats.train, step, micro_batch_size=MBS, grad_accum=1, dp=1, dp_rank=0, seed=settings.seed,
            length=_batches.seq_len(feats.train), pad_id=pad, pad_to_longest=True)))
        for step in range(len(history))
    ]  # fmt: skip
    rates = [h["tokens_per_second"] for h in history]
    return _aggregate(tokens, rates), _median([t / r for t, r in zip(tokens, rates, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma list of tiny, small")
    parser.add_argument("--steps", type=int, default=50, help="50 = one epoch of the 400 rows at batch 8")
    parser.add_argument("--rounds", type=int, default=3, help="alternating hf / megatron TP=1 rounds")
    parser.add_argument(
        "--layouts", default="2x1,1x2,2x2", help="TPxPP layouts timed after TP=1 ('' for none)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

    sys.path.insert(0, str(ROOT / "bench"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            if name == "tiny":
                model_dir = Path(CHECKPOINT_DIR)
            else:
                from finetune import _small_model  # bench/finetune.py's ~30M-param Llama

                model_dir = _small_model(work / "small")
            start = time.perf_counter()
            # hf and megatron alternate in rounds and each round's ratio is taken within it: this
            # machine's speed drifts by tens of percent between minutes
            rounds: list[tuple[float, float, float]] = []
            for k in range(args.rounds):
                steal0, total0 = _cpu_ticks()
                hf = hf_tokens_per_s(model_dir, args.steps, work / f"{name}-{k}")
                steal1, total1 = _cpu_ticks()
                mg, mg_step = megatron_run(model_dir, args.steps, 1, 1)
                steal2, total2 = _cpu_ticks()
                rounds.append((hf, mg, mg_step))
                steal = [
                    100 * s / max(t, 1)
                    for s, t in ((steal1 - steal0, total1 - total0), (steal2 - steal1, total2 - total1))
                ]
                print(f"[{name}] round {k + 1}: hf backend TP=1 {hf:9.0f} tok/s   megatron TP=1 "
                      f"{mg:9.0f} tok/s   ratio {mg / hf:.2f}x   "
                      f"(CPU steal {steal[0]:.0f} % / {steal[1]:.0f} %)")  # fmt: skip
            ratio = statistics.median(mg / hf for hf, mg, _ in rounds)
            hf = statistics.median(r[0] for r in rounds)
            mg = statistics.median(r[1] for r in rounds)
            mg_step = statistics.median(r[2] for r in rounds)
            print(f"[{name}] hf backend TP=1: {hf:9.0f} tok/s   megatron TP=1: {mg:9.0f} tok/s   "
                  f"ratio megatron/hf = {ratio:.2f}x, median of {len(rounds)} rounds "
                  "(target >= 1.0x)")  # fmt: skip
            for tp, pp in (tuple(int(n) for n in lay.split("x")) for lay in args.layouts.split(",") if lay):
                tps, step = megatron_run(model_dir, args.steps, tp, pp)
                ratio = step / mg_step
                print(f"[{name}] megatron TP={tp} PP={pp}: {tps:9.0f} tok/s, step {step * 1000:7.1f} ms "
                      f"({ratio:.2f}x the TP=1 step; {tp * pp} ranks on this machine's cores)")  # fmt: skip
            print(f"[{name}] wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
