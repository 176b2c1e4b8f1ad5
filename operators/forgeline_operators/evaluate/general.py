"""The general-ability check every finetune stage runs by default: the tuned model beside its parent.

Fine-tuning on a narrow task can wreck what a model could already do while every task metric
improves (issue 17: SmolLM2 answered "What is the capital of France?" with "France" after learning
five one-word tasks). So after training, the tuned model and the model it started from answer the
same fixed instruction prompts (greedy, rendered with the model's chat template when it has one,
as the endpoint renders them) and are scored on the same held-out English paragraphs. The answers
go to an MLflow table side by side (``general/answers.json``), the numbers to the stage's run as
``general_*`` metrics. This check reports; gating belongs to evaluate stages (``contains`` on a
fixed-prompt set, perplexity on held-out text), which a workflow places where it wants them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from forgeline.runtime.context import StageContext
from forgeline_operators.data import encode_rows, generation_prompt, pad_token_id, resolve_rendering

__all__ = ["PROMPTS", "TEXTS", "after_finetune", "general_check"]

MAX_CHECK_BYTES = 4 * 2**30  # ~1B parameters in fp32: larger models skip the CPU check

# Instruction prompts with the short key a sensible answer contains (graded by ``contains``).
PROMPTS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Australia?", "Canberra"),
    ("What planet do we live on?", "Earth"),
    ("What is the opposite of hot?", "cold"),
    ("How many legs does a spider have?", "eight"),
    ("What color is the sky on a clear day?", "blue"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Who wrote the play Hamlet?", "Shakespeare"),
    ("What is H2O commonly called?", "water"),
    ("Which season comes after winter?", "spring"),
    ("What do you call a baby cat?", "kitten"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("What is the main language spoken in Spain?", "Spanish"),
    ("What is frozen water called?", "ice"),
    ("Which star is at the center of our solar system?", "Sun"),
    ("How many hours are in a day?", "24"),
    ("What instrument has black and white keys?", "piano"),
    ("What is the capital of Japan?", "Tokyo"),
)

# Held-out English prose, written for this check (never in any shipped training file).
TEXTS: tuple[str, ...] = (
    "The village sat at the edge of a wide valley. Every morning the baker opened his shop before "
    "sunrise, and the smell of fresh bread drifted down the narrow streets toward the river.",
    "Water boils at a lower temperature on a high mountain because the air pressure there is lower. "
    "Climbers who cook at altitude often find that their food takes longer to prepare.",
    "She opened the old letter carefully. The paper was thin and yellow, and the ink had faded, but "
    "she could still read the first line: the writer promised to return before the winter.",
    "A good habit is easier to keep when it is small. Reading ten pages a day adds up to more than a "
    "dozen books in a year, without ever feeling like a large task.",
    "The museum reopened after two years of repairs. Visitors can now see the restored paintings in "
    "brighter rooms, and a new hall explains how the artists mixed their colors.",
    "Bees visit thousands of flowers to collect nectar. Back in the hive, they turn it into honey and "
    "store it in wax cells, which keeps the colony fed through the cold months.",
    "The train was late, so the passengers waited on the platform and talked about the weather. When "
    "it finally arrived, everyone hurried aboard to find a seat by the window.",
    "Learning a language takes patience. Most people understand far more than they can say at first, "
    "and speaking becomes easier after many short conversations.",
)


def _model_dir(outputs: Sequence[Path]) -> Path | None:
    """The tuned model among a finetune stage's outputs: a directory holding a full checkpoint."""
    for path in outputs:
        if (path / "config.json").is_file():
            return path
    return None


def _answers_and_scores(
    model_dir: Path, tokenizer: Any, prompts: list[list[int]], examples: Any, max_new_tokens: int
) -> tuple[list[str], float]:
    from forgeline_operators.evaluate.operator import _generate, _load_model
    from forgeline_operators.lib.scoring import score_examples

    vocab = max(max(e.input_ids) for e in examples) + 1
    model = _load_model(model_dir, max(vocab, max(max(p) for p in prompts) + 1))
    with torch.no_grad():
        scores = score_examples(model, examples, 8, pad_token_id(tokenizer))
        answers = _generate(model, tokenizer, prompts, 8, max_new_tokens)
    return answers, scores.loss


def general_check(
    ctx: StageContext, tuned_dir: Path, parent_dir: Path, *, max_new_tokens: int = 32, tokenizer: Any = None
) -> dict[str, float]:
    """Answers and held-out perplexity of the tuned model and its parent; logged, and returned.

    ``tokenizer`` is the tuned model's (loaded from ``tuned_dir`` when not given); both models are fed
    its token ids, so their tokenizers must agree (:func:`after_finetune` checks)."""
    import math

    from forgeline_operators.evaluate.operator import contains

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(tuned_dir))
    rendering = resolve_rendering(tokenizer, "auto")
    prompts = [generation_prompt(tokenizer, {"prompt": p, "completion": k}, rendering) for p, k in PROMPTS]
    examples = encode_rows(tokenizer, [{"text": t} for t in TEXTS], "text", 256).examples
    tuned_answers, tuned_loss = _answers_and_scores(tuned_dir, tokenizer, prompts, examples, max_new_tokens)
    parent_answers, parent_loss = _answers_and_scores(
        parent_dir, tokenizer, prompts, examples, max_new_tokens
    )
    keys = [k for _, k in PROMPTS]
    tuned_hits = [contains(a, k) for a, k in zip(tuned_answers, keys, strict=True)]
    parent_hits = [contains(a, k) for a, k in zip(parent_answers, keys, strict=True)]
    metrics = {
        "general_perplexity": math.exp(tuned_loss),
        "general_parent_perplexity": math.exp(parent_loss),
        "general_perplexity_change": math.exp(tuned_loss - parent_loss) - 1,
        "general_contains": sum(tuned_hits) / len(keys),
        "general_parent_contains": sum(parent_hits) / len(keys),
    }
    ctx.log_metrics(metrics)
    ctx.log_table(
        {
            "prompt": [p for p, _ in PROMPTS],
            "key": keys,
            "parent": parent_answers,
            "tuned": tuned_answers,
            "parent_contains": parent_hits,
            "tuned_contains": tuned_hits,
        },
        "general/answers.json",
    )
    ctx.logger.info(
        "general check: contains %.2f (parent %.2f), held-out perplexity %.3f (parent %.3f)",
        metrics["general_contains"],
        metrics["general_parent_contains"],
        metrics["general_perplexity"],
        metrics["general_parent_perplexity"],
    )
    return metrics


def after_finetune(ctx: StageContext, outputs: Sequence[Path]) -> dict[str, float]:
    """Run :func:`general_check` for a finished finetune stage when it applies (``general_check: true``,
    a full checkpoint among the outputs, a parent that is a full checkpoint); why not, in the log."""
    stage = ctx.stage
    if not getattr(stage, "general_check", False):
        return {}
    tuned = _model_dir(outputs)
    parent = ctx.input_path(stage.base)
    if tuned is None or not (parent / "config.json").is_file():
        ctx.logger.info("general check skipped: no full checkpoint among the outputs or the parent")
        return {}
    weights = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in tuned.glob(pattern))
    if weights > MAX_CHECK_BYTES:
        # Both models load in fp32 on the CPU here: for a large model that is minutes and tens of GiB.
        ctx.logger.info(
            "general check skipped: %.1f GiB of weights (the check loads both models in fp32 on CPU; "
            "above %.0f GiB use an evaluate stage instead)",
            weights / 2**30,
            MAX_CHECK_BYTES / 2**30,
        )
        return {}
    tokenizer = AutoTokenizer.from_pretrained(str(tuned))
    if AutoTokenizer.from_pretrained(str(parent)).get_vocab() != tokenizer.get_vocab():
        ctx.logger.warning("general check skipped: the parent's tokenizer differs from the tuned model's")
        return {}
    torch.set_num_threads(ctx.threads)
    return general_check(ctx, tuned, parent, tokenizer=tokenizer)
