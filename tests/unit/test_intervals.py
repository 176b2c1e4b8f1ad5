"""Paired bootstrap intervals (evaluate gates) and the one chat-template rendering of sft rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from forgeline_operators.data import IGNORE_INDEX, encode_row, generation_prompt, resolve_rendering
from forgeline_operators.lib.intervals import RowStats, paired_bootstrap

TINY = Path(__file__).resolve().parents[2] / "operators/forgeline_operators/models/tiny_llama"


def _stats(nll: list[float], tokens: list[int], exact: list[int]) -> RowStats:
    t = np.asarray(tokens, dtype=float)
    return RowStats(np.asarray(nll, dtype=float), t, t * 0.5, np.asarray(exact, dtype=float))


def test_identical_models_have_a_zero_interval() -> None:
    a = _stats([3.0, 1.0, 2.0, 4.0], [3, 1, 2, 2], [1, 0, 1, 0])
    out = paired_bootstrap(a, a, ["perplexity", "exact_match"], resamples=200)
    for i in out.values():
        assert i.delta == i.delta_low == i.delta_high == 0
        assert i.regression_low == i.regression_high == 0


def test_interval_equals_a_by_hand_bootstrap_with_the_same_resamples() -> None:
    rng = np.random.default_rng(1)
    n = 30
    cand = _stats(list(rng.uniform(1, 3, n)), list(rng.integers(1, 5, n)), list(rng.integers(0, 2, n)))
    base = _stats(list(rng.uniform(1, 4, n)), [int(x) for x in cand.tokens], list(rng.integers(0, 2, n)))
    out = paired_bootstrap(cand, base, ["perplexity", "exact_match"], resamples=500, seed=7)
    idx = np.random.default_rng(7).integers(0, n, size=(500, n))
    ppl = [
        math.exp(cand.nll[r].sum() / cand.tokens[r].sum())
        / math.exp(base.nll[r].sum() / base.tokens[r].sum())
        - 1
        for r in idx
    ]
    em = [cand.exact[r].mean() - base.exact[r].mean() for r in idx]  # type: ignore[index]
    assert out["perplexity"].regression_high == pytest.approx(np.percentile(ppl, 97.5))
    assert out["perplexity"].regression_low == pytest.approx(np.percentile(ppl, 2.5))
    assert out["exact_match"].delta_low == pytest.approx(np.percentile(em, 2.5))
    assert out["exact_match"].delta == pytest.approx(cand.exact.mean() - base.exact.mean())  # type: ignore[union-attr]


def test_a_win_on_a_few_rows_does_not_clear_a_zero_tolerance() -> None:
    """Better on average, but only thanks to 2 of 40 rows: the worst end of the interval is worse."""
    n = 40
    base = _stats([2.0] * n, [4] * n, [0] * n)
    cand = _stats([2.05] * (n - 2) + [0.0, 0.0], [4] * n, [0] * n)
    i = paired_bootstrap(cand, base, ["perplexity"])["perplexity"]
    assert i.regression < 0 < i.regression_high


@pytest.fixture(scope="module")
def tiny_tokenizer() -> object:
    return AutoTokenizer.from_pretrained(TINY)


def test_prompt_completion_rows_render_as_the_chat_the_endpoint_sends(tiny_tokenizer: object) -> None:
    tok: object = tiny_tokenizer
    row = {"prompt": "Repeat after me:\nred dog", "completion": "red dog"}
    messages = [{"role": "user", "content": row["prompt"]}]
    endpoint_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    endpoint_ids = tok(endpoint_text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    example = encode_row(tok, row, "sft", 256)
    start = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert generation_prompt(tok, row) == example.input_ids[:start] == endpoint_ids
    assert tok.decode(example.input_ids[start:]) == "red dog</s>\n"  # type: ignore[attr-defined]
    raw = encode_row(tok, row, "sft", 256, rendering="raw")
    assert raw.input_ids != example.input_ids and raw.input_ids[-1] == tok.eos_token_id  # type: ignore[attr-defined]


def test_renderings_are_resolved_per_tokenizer(tiny_tokenizer: object) -> None:
    assert resolve_rendering(tiny_tokenizer) == "chat_template"
    assert resolve_rendering(tiny_tokenizer, "raw") == "raw"

    class NoTemplate:
        chat_template = None

    assert resolve_rendering(NoTemplate()) == "raw"
    with pytest.raises(ValueError, match="has no chat template"):
        resolve_rendering(NoTemplate(), "chat_template")
