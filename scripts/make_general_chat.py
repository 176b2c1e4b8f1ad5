"""Regenerate the general-chat rows of the real-model quickstart from the base model itself (offline).

    PYTHONPATH=platform:operators python scripts/make_general_chat.py --model DIR [--out workflows/data]

Fine-tuning SmolLM2-135M-Instruct on the five one-word tasks alone narrowed its chat answers ("What
is the capital of France?" -> "France"), and perplexity on general text did not see it (issue 17).
The remedy here is self-distillation replay: the base model's own greedy answers to general prompts,
mixed into the SFT rows, so tuning is pulled back to what the model already did. No download is
involved: the prompts are written below, the answers come from the model named by ``--model`` (the
converted ``builtin://smollm2-135m-instruct`` directory). Only answers that end (end-of-turn within
``--max-new-tokens``) are kept, so every replayed row teaches the model to stop.

Writes:
- ``general_chat.jsonl``: the replay rows (prompt, the base model's answer);
- ``chat_sft_mix.jsonl``: ``chat_sft.jsonl`` interleaved with the replay rows (the real-model SFT set);
- ``general_check.jsonl``: fixed instruction prompts with a short key answer (``"Paris"``) graded by
  the evaluate stage's ``contains`` metric; disjoint from the replay prompts, and kept only where the
  base model's answer contains the key, so a drop is the tuning's doing.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from forgeline_operators.evaluate.general import PROMPTS

ROOT = Path(__file__).resolve().parents[1]

_COUNTRIES = (
    "Italy",
    "Spain",
    "Germany",
    "Canada",
    "Egypt",
    "Russia",
    "China",
    "Greece",
    "Portugal",
    "Ireland",
    "Norway",
    "Sweden",
    "Poland",
    "Mexico",
    "Argentina",
    "India",
    "Kenya",
    "Turkey",
    "Austria",
)
_TOPICS = (
    "the ocean",
    "a forest in autumn",
    "the moon",
    "a busy city",
    "rain",
    "mountains",
    "a library",
    "friendship",
    "the desert",
    "a thunderstorm",
    "coffee",
    "the night sky",
)
_CONCEPTS = (
    "photosynthesis",
    "gravity",
    "a computer",
    "democracy",
    "a volcano",
    "the internet",
    "an atom",
    "a rainbow",
    "evaporation",
    "a vaccine",
    "inflation",
    "a battery",
    "a galaxy",
    "an earthquake",
    "a calendar",
    "recycling",
)
_ADVICE = (
    "How can I sleep better?",
    "How do I start learning to cook?",
    "What are some ways to stay focused while studying?",
    "How can I save money each month?",
    "How do I make a good first impression?",
    "What should I pack for a day hike?",
    "How can I improve my handwriting?",
    "How do I keep a houseplant alive?",
    "What is a good way to learn a new language?",
    "How can I reduce stress?",
    "How do I write a polite email to my teacher?",
    "What are healthy snacks for work?",
)
_FACTS = (
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "What is the boiling point of water in Celsius?",
    "How many days are in a week?",
    "What gas do plants absorb from the air?",
    "What is the longest river in Africa?",
    "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What is the freezing point of water in Fahrenheit?",
    "What language is spoken in Brazil?",
    "What is the tallest mountain in the world?",
    "Who was the first person to walk on the moon?",
    "What is the smallest prime number?",
    "What do bees make?",
    "What is the main ingredient in guacamole?",
)
_TASKS = (
    "Give me three tips for a job interview.",
    "Write a short haiku about spring.",
    "Suggest a name for a friendly dog.",
    "List three fruits that are red.",
    "Describe a cat in two sentences.",
    "Write a one-line slogan for a bakery.",
    "Tell me a fun fact about octopuses.",
    "Summarize the story of Cinderella in one sentence.",
    "Give an example of a renewable energy source.",
    "Write a friendly greeting for a new neighbor.",
    "Name two instruments in an orchestra.",
    "What is a good title for a story about a lost key?",
)

# Held out from the replay rows: the fixed general check (the finetune stages' prompts too).
CHECK = PROMPTS


def replay_prompts() -> list[str]:
    prompts = [f"What is the capital of {c}?" for c in _COUNTRIES]
    prompts += [f"Write one sentence about {t}." for t in _TOPICS]
    prompts += [f"Explain {c} in one or two sentences." for c in _CONCEPTS]
    prompts += list(_ADVICE) + list(_FACTS) + list(_TASKS)
    checked = {p for p, _ in CHECK}
    assert not checked & set(prompts), "the general check must stay disjoint from the replay rows"
    return prompts


def generate(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy chat answers (rendered with the model's chat template) and whether each one ended."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out: list[tuple[str, bool]] = []
    for i in range(0, len(prompts), 16):
        batch = prompts[i : i + 16]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in batch
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            ended = eos in row
            ids = row[: row.index(eos)] if ended else row
            out.append((tok.decode(ids, skip_special_tokens=True).strip(), ended))
    return out


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the converted SmolLM2 HF directory")
    ap.add_argument("--out", type=Path, default=ROOT / "workflows" / "data")
    ap.add_argument("--max-new-tokens", type=int, default=72)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    prompts = replay_prompts()
    answers = generate(args.model, prompts, args.max_new_tokens)
    replay = [
        {"prompt": p, "completion": a} for p, (a, ended) in zip(prompts, answers, strict=True) if ended and a
    ]
    _write(args.out / "general_chat.jsonl", replay)

    tasks = [json.loads(line) for line in (args.out / "chat_sft.jsonl").read_text().splitlines() if line]
    mix = tasks + replay
    random.Random(args.seed).shuffle(mix)
    _write(args.out / "chat_sft_mix.jsonl", mix)

    check_answers = generate(args.model, [p for p, _ in CHECK], args.max_new_tokens)
    check = []
    for (prompt, key), (answer, _) in zip(CHECK, check_answers, strict=True):
        if key.lower() in answer.lower():
            check.append({"prompt": prompt, "completion": key})
        else:
            print(f"check prompt dropped (the base model misses it): {prompt!r} -> {answer!r}")
    _write(args.out / "general_check.jsonl", check)
    print(f"replay rows {len(replay)}/{len(prompts)}, mix {len(mix)}, check {len(check)}/{len(CHECK)}")


if __name__ == "__main__":
    main()
