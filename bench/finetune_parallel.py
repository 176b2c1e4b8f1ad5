"""megatron backend throughput: TP=1 tokens/s vs the hf backend on the same model, data and batch,
and TP=2 / PP=2 / TP2xPP2 step times on this machine.

    PYTHONPATH=platform:operators python bench/finetune_parallel.py [--models tiny,small] [--steps 20]

Both backends train full SFT in fp32 with 1 thread per rank on the same tokenised rows
(``forgeline_operators.data``), micro batch 8, max_seq_len 64, for ``--steps`` optimizer steps; the hf
side is the real hf backend (``finetune.sft.train``: trl SFTTrainer), the megatron side the real
``megatron.loop.run`` on forked gloo ranks. tokens/s counts non-padding input tokens (both sides),
median over the steps after the first two (warm-up). ``small`` is bench/finetune.py's ~30M-param
random-weight Llama (throughput only). Not part of the test suite.
"""

from __future__ import annotations

import argparse
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
    from forgeline_operators.finetune import sft
    from forgeline_operators.finetune._train import load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    return sft.features(tok, rows, [], "sft", SEQ), pad_token_id(tok)


def _median(values: list[float]) -> float:
    return statistics.median(values[2:] if len(values) > 3 else values)


def hf_tokens_per_s(model_dir: Path, steps: int, work: Path) -> float:
    from forgeline.spec import FinetuneStage
    from forgeline_operators.finetune import sft
    from forgeline_operators.finetune._job import Schedule, TrainJob

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
    return _median([h["tokens_per_second"] for h in outcome.history if "tokens_per_second" in h])


def megatron_run(model_dir: Path, steps: int, tp: int, pp: int) -> tuple[float, float]:
    """(median tokens/s, median step seconds) at this layout."""
    from forgeline_operators.finetune.megatron import engine, launch, loop
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
    tps = _median([h["tokens_per_second"] for h in history])
    tokens = sum(len(f["input_ids"]) for f in feats.train) / len(feats.train) * MBS
    return tps, tokens / tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma list of tiny, small")
    parser.add_argument("--steps", type=int, default=20)
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
            hf = hf_tokens_per_s(model_dir, args.steps, work / name)
            mg, mg_step = megatron_run(model_dir, args.steps, 1, 1)
            print(f"[{name}] hf backend TP=1: {hf:9.0f} tok/s   megatron TP=1: {mg:9.0f} tok/s   "
                  f"ratio megatron/hf = {mg / hf:.2f}x (target >= 1.0x)")  # fmt: skip
            for tp, pp in ((2, 1), (1, 2), (2, 2)):
                tps, step = megatron_run(model_dir, args.steps, tp, pp)
                ratio = step / mg_step
                print(f"[{name}] megatron TP={tp} PP={pp}: {tps:9.0f} tok/s, step {step * 1000:7.1f} ms "
                      f"({ratio:.2f}x the TP=1 step; {tp * pp} ranks on this machine's cores)")  # fmt: skip
            print(f"[{name}] wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
