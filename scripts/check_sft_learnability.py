"""Check that ``builtin://tiny-llama`` visibly learns ``workflows/data/chat_sft.jsonl`` (~30-60 s, CPU).

    PYTHONPATH=platform:operators python scripts/check_sft_learnability.py [--steps 300]

A plain PyTorch full fine-tune, independent of the platform's operators so it vouches for the data
and the base model rather than for the trainer: each row is rendered with the tokenizer's chat
template (user = prompt, assistant = completion), the loss is masked to the completion tokens and
EOS, and ``held_out.jsonl`` is scored before and after by teacher-forced token accuracy on those
tokens and by exact match of the greedy completion. Exits 1 if token accuracy does not rise by at
least 0.2, so the datasets can be regenerated with confidence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "workflows/data"
MIN_GAIN = 0.2
# The fixed opening of each template in scripts/make_datasets.py names its task.
TASK_PREFIXES = {
    "Repeat after me": "repeat",
    "What is the first word": "first_word",
    "What is the last word": "last_word",
    "Is this review": "sentiment",
    "Is the ": "category",
}


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _encode(tokenizer: Any, row: dict[str, str]) -> tuple[list[int], int]:
    """(ids, index of the first completion token)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    # The template writes BOS itself, so the tokenizer must not add another.
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    return prompt_ids + completion + [tokenizer.eos_token_id], len(prompt_ids)


def _batch(encoded: list[tuple[list[int], int]], pad_id: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (row, start) in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start : len(row)] = torch.tensor(row[start:])
        mask[i, : len(row)] = 1
    return ids, labels, mask


def evaluate(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> dict[str, float]:
    import torch

    model.eval()
    correct = total = exact = 0
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with torch.no_grad():
        for row in rows:
            ids, start = _encode(tokenizer, row)
            x = torch.tensor([ids])
            pred = model(input_ids=x).logits[0, start - 1 : -1].argmax(-1)
            correct += int((pred == x[0, start:]).sum())
            total += len(ids) - start
            out = model.generate(x[:, :start], max_new_tokens=16, do_sample=False)
            text = tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()
            hit = int(text == row["completion"])
            exact += hit
            task = next(name for prefix, name in TASK_PREFIXES.items() if row["prompt"].startswith(prefix))
            per_task[task][0] += hit
            per_task[task][1] += 1
    result = {"token_accuracy": correct / total, "exact_match": exact / len(rows)}
    result.update({f"exact_match[{k}]": v[0] / v[1] for k, v in sorted(per_task.items())})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--data", type=Path, default=DATA, help="directory with chat_sft/held_out.jsonl")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgeline_operators.models.tiny_llama import SOURCE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        SOURCE.materialize(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp)
    train, held_out = _rows(args.data / "chat_sft.jsonl"), _rows(args.data / "held_out.jsonl")
    before = evaluate(model, tokenizer, held_out)
    print("held-out before:", json.dumps(before, indent=None))

    encoded = [_encode(tokenizer, r) for r in train]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.monotonic()
    order: list[int] = []
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order = torch.randperm(len(encoded), generator=gen).tolist()
        picked, order = order[: args.batch_size], order[args.batch_size :]
        ids, labels, mask = _batch([encoded[i] for i in picked], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  completion loss {loss.item():.3f}")
    seconds = time.monotonic() - start
    after = evaluate(model, tokenizer, held_out)
    print(f"{args.steps} steps of batch {args.batch_size} in {seconds:.1f}s")
    print("held-out after: ", json.dumps(after, indent=None))
    gain = after["token_accuracy"] - before["token_accuracy"]
    return 0 if gain >= MIN_GAIN else 1


if __name__ == "__main__":
    sys.exit(main())
