"""Rebuild ``builtin://tiny-llama``: corpus (optionally), tokenizer, pre-trained weights.

    PYTHONPATH=platform:operators python scripts/make_tiny_llama.py \
        --out operators/forgeline_operators/models/tiny_llama [--regenerate-corpus]

By default it trains from the shipped corpus, which makes the result independent of the interpreter;
``--regenerate-corpus`` first re-harvests the stdlib docstrings of the running Python (the shipped
corpus came from CPython 3.11.7). Prints the held-out perplexity before and after pre-training; those
are the numbers to quote. Runs on one thread (~5 min): on a shared 2-core box more threads are slower.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from forgeline_operators.models import _build, _corpus

CORPUS_DIR = Path(__file__).resolve().parents[1] / "operators/forgeline_operators/models/corpus"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to (over)write")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="directory of *.txt documents")
    parser.add_argument("--regenerate-corpus", action="store_true", help="re-harvest the corpus first")
    parser.add_argument("--steps", type=int, default=_build.PretrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    if args.regenerate_corpus:
        counts = _corpus.write_corpus(args.corpus, seed=args.seed)
        print(f"corpus written to {args.corpus}: {counts}")
    train, held_out = _corpus.split_documents(_corpus.read_corpus(args.corpus))
    print(f"{len(train)} training documents, {len(held_out)} held out")

    tokenizer = _build.train_tokenizer(train)
    model = _build.build_model(tokenizer, seed=args.seed)
    print(f"parameters: {model.num_parameters()}")
    before = _build.perplexity(model, tokenizer, held_out)
    print(f"held-out perplexity before pre-training: {before:.1f} (vocab {len(tokenizer)})")

    start = time.monotonic()
    cfg = _build.PretrainConfig(steps=args.steps, seed=args.seed)
    _build.pretrain(model, tokenizer, train, cfg)
    after = _build.perplexity(model, tokenizer, held_out)
    print(f"held-out perplexity after {cfg.steps} steps ({time.monotonic() - start:.0f}s): {after:.1f}")

    files = _build.save(model, tokenizer, args.out)
    size = sum((args.out / f).stat().st_size for f in files)
    print(f"wrote {files} to {args.out} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
