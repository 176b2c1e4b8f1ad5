"""The evaluate operator and the shared tokenisation, on a real tiny Llama and a tokenizer trained here.

No mocks: the metrics are checked against transformers' own causal-LM loss and an argmax count, gates
against a model that is really worse (untrained) than another (a few optimizer steps on the data).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from forgeline.artifacts import sha256_file
from forgeline.runtime.context import DatasetInput, GateFailed, MemorySink, OperatorError, StageContext
from forgeline_operators.data import IGNORE_INDEX, encode_row, generation_prompt
from forgeline_operators.evaluate.operator import contains, run
from forgeline_operators.lib.intervals import read_rows

torch.set_num_threads(1)

QA = [
    ("Q: what is 1 plus 2?\nA:", " 3"),
    ("Q: 2 plus 2?\nA:", " 4"),
    ("Q: what do you get when you add 3 and 4?\nA:", " 7"),
    ("Q: 5 plus 1?\nA:", " 6"),
    ("Q: what is 6 plus 3?\nA:", " 9"),
    ("Q: add 7 and 2, what is the sum?\nA:", " the sum is 9"),
]
TEXTS = ["the cat sat on the mat.", "a dog ran in the park.", "the sun is hot today."]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([p + c for p, c in QA] * 4 + TEXTS * 4, trainer)
    # Like Llama's tokenizer: BOS in front of every sequence, nothing after.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    shape: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _manual_example(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """The documented plain join, built by hand: [BOS] prompt completion [EOS], prompt masked."""
    p = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    c = [*tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return p + c, [IGNORE_INDEX] * len(p) + c


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("eval")
    tokenizer = _tokenizer()
    base = _model(tokenizer)
    base_dir, tuned_dir = root / "base", root / "tuned"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    # "Tuned" = a few optimizer steps on the data: measurably better than the random base.
    tuned = _model(tokenizer).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-2)
    batch = [_manual_example(tokenizer, p, c) for p, c in QA]
    for _ in range(30):
        for ids, labels in batch:
            loss = tuned(torch.tensor([ids]), labels=torch.tensor([labels])).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.eval().save_pretrained(tuned_dir)
    tokenizer.save_pretrained(tuned_dir)

    sft = root / "qa.jsonl"
    sft.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in QA))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return SimpleNamespace(
        root=root, tokenizer=tokenizer, base_dir=base_dir, tuned_dir=tuned_dir, sft=sft, text=text
    )


def _dataset(name: str, path: Path, fmt: str) -> DatasetInput:
    return DatasetInput(name=name, path=path, format=fmt, sha256=sha256_file(path))


def _ctx(
    assets: SimpleNamespace, tmp_path: Path, datasets: list[DatasetInput] | None = None, **fields: Any
) -> StageContext:
    gates = SimpleNamespace(
        max_perplexity=None,
        min_token_accuracy=None,
        min_exact_match=None,
        min_contains=None,
        max_regression_vs=None,
        max_regression=0.0,
        min_improvement=None,
        confidence=0.95,
        bootstrap_samples=1000,
        baseline_ref=None,
    )
    for key in list(fields):
        if hasattr(gates, key):
            setattr(gates, key, fields.pop(key))
    stage = SimpleNamespace(
        name="eval",
        model="${stages.tune.outputs.model}",
        dataset="qa",
        metrics=["perplexity", "token_accuracy"],
        max_samples=None,
        batch_size=4,
        max_seq_len=64,
        max_new_tokens=8,
        gates=gates,
        lm_eval=None,
    )
    for key, value in fields.items():
        setattr(stage, key, value)
    refs = {"${model}": assets.base_dir, "${stages.tune.outputs.model}": assets.tuned_dir}
    datasets = datasets or [_dataset("qa", assets.sft, "sft"), _dataset("corpus", assets.text, "text")]
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    (tmp_path / "work").mkdir(parents=True, exist_ok=True)
    return StageContext(
        stage=stage,
        workflow=None,
        output_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        sink=MemorySink(),
        resolve=lambda ref: refs[ref],
        values=lambda ref: None,
        datasets={d.name: d for d in datasets},
        threads=1,
    )


def test_metrics_match_an_independent_computation(assets: SimpleNamespace, tmp_path: Path) -> None:
    result = run(_ctx(assets, tmp_path, max_samples=1))
    m = result.metrics
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-12)

    model = LlamaForCausalLM.from_pretrained(assets.tuned_dir).eval()
    ids, labels = _manual_example(assets.tokenizer, *QA[0])
    with torch.no_grad():
        out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
    assert m["loss"] == pytest.approx(out.loss.item(), abs=1e-4)
    graded = [i for i in range(1, len(ids)) if labels[i] != IGNORE_INDEX]
    predicted = out.logits[0].argmax(-1).tolist()
    correct = sum(predicted[i - 1] == ids[i] for i in graded)
    assert m["eval_tokens"] == len(graded)
    assert m["token_accuracy"] == correct / len(graded)
    assert 0.0 <= m["token_accuracy"] <= 1.0
    assert m["eval_rows"] == 1 and m["truncated_rows"] == 0


def test_batching_does_not_change_metrics(assets: SimpleNamespace, tmp_path: Path) -> None:
    one = run(_ctx(assets, tmp_path / "a", batch_size=1)).metrics
    many = run(_ctx(assets, tmp_path / "b", batch_size=4)).metrics
    assert many["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert many["token_accuracy"] == one["token_accuracy"]
    assert many["eval_rows"] == len(QA)


def test_report_and_logged_metrics(assets: SimpleNamespace, tmp_path: Path) -> None:
    ctx = _ctx(assets, tmp_path)
    result = run(ctx)
    report = result.outputs["report"]
    assert report == tmp_path / "out" / "report"
    summary = json.loads((report / "metrics.json").read_text())
    assert summary["metrics"] == pytest.approx(result.metrics)
    assert summary["gates"] == {"passed": True, "failures": []}
    samples = [json.loads(line) for line in (report / "samples.jsonl").read_text().splitlines()]
    assert [(s["prompt"], s["reference"]) for s in samples] == QA
    assert sum(s["tokens"] for s in samples) == result.metrics["eval_tokens"]
    assert isinstance(ctx.sink, MemorySink)
    assert ctx.sink.last("perplexity") == result.metrics["perplexity"]


def _eval_set(result: Any) -> str:
    return str(json.loads((result.outputs["report"] / "metrics.json").read_text())["eval_set_sha256"])


def test_per_row_sums_reproduce_the_metrics_and_the_eval_set_names_the_rows(
    assets: SimpleNamespace, tmp_path: Path
) -> None:
    """What a promotion pairs on: the report's per-row sums give back the stage's own metrics, and
    the eval-set digest depends on the rows scored, not on how they were batched."""
    one = run(_ctx(assets, tmp_path / "a", batch_size=1))
    rows = read_rows(one.outputs["report"] / "samples.jsonl")
    point = rows.values(np.arange(len(rows.nll))[None, :])
    assert point["perplexity"][0] == pytest.approx(one.metrics["perplexity"], rel=1e-9)
    assert point["token_accuracy"][0] == pytest.approx(one.metrics["token_accuracy"], rel=1e-12)
    assert _eval_set(run(_ctx(assets, tmp_path / "b", batch_size=4))) == _eval_set(one)
    assert _eval_set(run(_ctx(assets, tmp_path / "c", max_samples=2))) != _eval_set(one)


def test_text_format_grades_every_token(assets: SimpleNamespace, tmp_path: Path) -> None:
    m = run(_ctx(assets, tmp_path, dataset="corpus")).metrics
    tok = assets.tokenizer
    # BOS + text + EOS, every token but the first predicted.
    expected = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS)
    assert m["eval_tokens"] == expected


def test_truncation_is_counted(assets: SimpleNamespace, tmp_path: Path) -> None:
    lengths = sorted(len(_manual_example(assets.tokenizer, p, c)[0]) for p, c in QA)
    max_seq_len = lengths[len(lengths) // 2]
    assert 0 < sum(n > max_seq_len for n in lengths) < len(QA)  # the data straddles the limit
    m = run(_ctx(assets, tmp_path, max_seq_len=max_seq_len)).metrics
    assert m["truncated_rows"] == sum(n > max_seq_len for n in lengths)
    assert m["eval_rows"] == len(QA)


def test_nothing_left_after_truncation_is_an_error(assets: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match=r"6 truncated"):
        run(_ctx(assets, tmp_path, max_seq_len=4))


def test_model_against_itself_has_no_regression(assets: SimpleNamespace, tmp_path: Path) -> None:
    m = run(
        _ctx(assets, tmp_path, max_regression_vs="base", baseline_ref="${stages.tune.outputs.model}")
    ).metrics
    assert m["perplexity_regression"] == 0.0
    assert m["token_accuracy_regression"] == 0.0
    assert m["baseline_perplexity"] == m["perplexity"]


def test_min_improvement_needs_the_whole_interval_above(assets: SimpleNamespace, tmp_path: Path) -> None:
    """Against itself the gain is exactly 0 on every resample: not above 0, so the gate fails and
    names the metric, both values and the interval."""
    ctx = _ctx(
        assets,
        tmp_path,
        metrics=["perplexity", "token_accuracy"],
        max_regression_vs="tune",
        baseline_ref="${stages.tune.outputs.model}",
        min_improvement={"token_accuracy": 0.0},
    )
    with pytest.raises(GateFailed) as info:
        run(ctx)
    m = info.value.metrics
    assert m["token_accuracy_delta_ci_low"] == m["token_accuracy_delta_ci_high"] == 0.0
    assert "gate min_improvement.token_accuracy=0 failed" in str(info.value)
    assert "95% interval [+0.0000, +0.0000] does not lie above 0" in str(info.value)


def test_better_model_passes_regression_gate(assets: SimpleNamespace, tmp_path: Path) -> None:
    m = run(_ctx(assets, tmp_path, max_regression_vs="base", baseline_ref="${model}")).metrics
    assert m["perplexity"] < m["baseline_perplexity"]
    assert m["perplexity_regression"] < 0


def test_worse_model_fails_regression_gate(assets: SimpleNamespace, tmp_path: Path) -> None:
    ctx = _ctx(
        assets,
        tmp_path,
        model="${model}",  # the untrained base ...
        max_regression_vs="tune",  # ... against the tuned model
        baseline_ref="${stages.tune.outputs.model}",
        max_regression=0.02,
    )
    with pytest.raises(GateFailed) as info:
        run(ctx)
    m = info.value.metrics
    message = str(info.value)
    assert m["perplexity"] > m["baseline_perplexity"] * 1.02
    assert "gate max_regression_vs=tune failed: perplexity" in message
    assert f"{m['perplexity']:.3f}" in message and f"{m['baseline_perplexity']:.3f}" in message
    assert "(allowed 2.00% at the interval's worst end)" in message
    assert "95% interval of the regression [" in message
    # Metrics and report exist even though the gate failed.
    assert isinstance(ctx.sink, MemorySink) and ctx.sink.last("perplexity") == m["perplexity"]
    summary = json.loads((tmp_path / "out" / "report" / "metrics.json").read_text())
    assert summary["gates"]["passed"] is False


def test_max_perplexity_gate(assets: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(GateFailed) as info:
        run(_ctx(assets, tmp_path, max_perplexity=1.0001))
    ppl = info.value.metrics["perplexity"]
    assert f"gate max_perplexity=1.0001 failed: perplexity {ppl:.3f} is above 1.0001" == str(info.value)


def _greedy(model: Any, tok: Any, prompt: str, max_new_tokens: int = 6) -> str:
    """transformers' own greedy answer to a raw prompt (BOS + prompt), cut at EOS: the reference."""
    ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id
        )
    new = out[0, len(ids) :].tolist()
    return str(tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new))


def _generation_ctx(
    assets: SimpleNamespace, tmp_path: Path, rows: list[dict[str, str]], **fields: Any
) -> StageContext:
    """A context evaluating ``rows`` (an sft file written here) with 6 new tokens per answer."""
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _ctx(
        assets, tmp_path, datasets=[_dataset("gen", path, "sft")], dataset="gen", max_new_tokens=6, **fields
    )


def test_exact_match_uses_greedy_generation(assets: SimpleNamespace, tmp_path: Path) -> None:
    tok = assets.tokenizer
    model = LlamaForCausalLM.from_pretrained(assets.tuned_dir).eval()
    rows = []
    for prompt, _ in QA[:3]:
        rows.append({"prompt": prompt, "completion": _greedy(model, tok, prompt) + " "})  # stripped
    assert all(r["completion"].strip() for r in rows)
    rows.append({"prompt": QA[3][0], "completion": "definitely not this"})
    # batch 4: prompts of different lengths exercise left padding
    ctx = _generation_ctx(assets, tmp_path, rows, metrics=["exact_match"], batch_size=4)
    result = run(ctx)
    assert result.metrics["exact_match"] == 0.75
    samples = [json.loads(line) for line in (tmp_path / "out" / "report" / "samples.jsonl").open()]
    assert [s["exact_match"] for s in samples] == [True, True, True, False]
    assert samples[0]["prediction"].strip() == rows[0]["completion"].strip()
    per_row = read_rows(tmp_path / "out" / "report" / "samples.jsonl")
    assert per_row.exact is not None and per_row.exact.mean() == 0.75


def test_contains_grades_the_key_in_a_free_answer(assets: SimpleNamespace, tmp_path: Path) -> None:
    """A reference found as whole words in the greedy answer counts for ``contains``, not ``exact_match``;
    the answers go to an MLflow table beside the baseline's."""
    tok = assets.tokenizer
    model = LlamaForCausalLM.from_pretrained(assets.tuned_dir).eval()
    rows = []
    exact = []
    for prompt, _ in [QA[0], QA[1], QA[5]]:
        answer = _greedy(model, tok, prompt)
        key = answer.split()[-1].upper()  # the answer's last word, in another case: found all the same
        rows.append({"prompt": prompt, "completion": key})
        exact.append(answer.strip() == key)
    assert not all(exact)  # at least one key is only part of its answer
    rows.append({"prompt": QA[3][0], "completion": "definitely not this"})
    ctx = _generation_ctx(
        assets,
        tmp_path,
        rows,
        metrics=["exact_match", "contains"],
        max_regression_vs="base",
        baseline_ref="${model}",
        max_regression=1.0,
    )
    result = run(ctx)
    assert result.metrics["contains"] == 0.75
    assert result.metrics["exact_match"] == sum(exact) / 4
    assert "contains_regression_ci_high" in result.metrics
    table = ctx.sink.tables["eval/eval_answers.json"]  # type: ignore[attr-defined]
    assert table["reference"] == [r["completion"] for r in rows]
    assert table["contains"] == [True, True, True, False]
    assert len(table["baseline_prediction"]) == 4 and "baseline_contains" in table
    assert table["prompt"] == [r["prompt"] for r in rows]


@pytest.mark.parametrize(
    ("answer", "key", "found"),
    [
        ("The capital of France is Paris.", "Paris", True),
        ("paris, of course", "Paris", True),
        ("Parisian cafes", "Paris", False),
        ("It is the Pacific\nOcean", "Pacific Ocean", True),
        ("24 hours", "4", False),
        ("anything", "  ", False),
    ],
)
def test_contains_matches_whole_words(answer: str, key: str, found: bool) -> None:
    assert contains(answer, key) is found


def test_exact_match_needs_sft_data(assets: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="exact_match needs an sft dataset"):
        run(_ctx(assets, tmp_path, dataset="corpus", metrics=["exact_match"]))


def test_changed_dataset_is_refused(assets: SimpleNamespace, tmp_path: Path) -> None:
    stale = DatasetInput(name="qa", path=assets.sft, format="sft", sha256="0" * 64)
    with pytest.raises(OperatorError, match="changed since the run was planned"):
        run(_ctx(assets, tmp_path, datasets=[stale]))


# --- shared tokenisation -------------------------------------------------------------------------


def test_plain_join_masks_the_prompt(assets: SimpleNamespace) -> None:
    tok = assets.tokenizer
    example = encode_row(tok, {"prompt": QA[0][0], "completion": QA[0][1]}, "sft", 64)
    assert (example.input_ids, example.labels) == _manual_example(tok, *QA[0])
    assert generation_prompt(tok, {"prompt": QA[0][0], "completion": QA[0][1]}) == [
        tok.bos_token_id,
        *tok(QA[0][0], add_special_tokens=False)["input_ids"],
    ]


def _graded_text(tok: Any, example: Any) -> list[str]:
    """Decoded runs of consecutive graded tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        graded = label != IGNORE_INDEX
        if graded and not previous:
            runs.append([])
        if graded:
            runs[-1].append(token)
        previous = graded
    return [tok.decode(run) for run in runs]


MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_chat_without_template_grades_assistant_turns(assets: SimpleNamespace) -> None:
    tok = assets.tokenizer
    example = encode_row(tok, {"messages": MESSAGES}, "sft", 256)
    assert _graded_text(tok, example) == ["hello</s>", "4</s>"]
    prompt = tok.decode(generation_prompt(tok, {"messages": MESSAGES}))
    assert prompt == "<s>system: be brief\nuser: hi\nassistant: hello</s>user: 2+2?\nassistant: "


def test_chat_template_grades_assistant_turns(assets: SimpleNamespace) -> None:
    tok = assets.tokenizer
    saved = tok.chat_template
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        example = encode_row(tok, {"messages": MESSAGES}, "sft", 256)
        assert _graded_text(tok, example) == ["hello</s>", "4</s>"]
        prompt = generation_prompt(tok, {"messages": MESSAGES})
        assert tok.decode(prompt).endswith("<|user|>2+2?</s><|assistant|>")
        assert example.input_ids[: len(prompt)] == prompt
        truncated = encode_row(tok, {"messages": MESSAGES}, "sft", 10)
        assert truncated.truncated and len(truncated.input_ids) == 10
    finally:
        tok.chat_template = saved


def test_general_check_logs_answers_beside_the_parents(assets: SimpleNamespace, tmp_path: Path) -> None:
    """The default after-finetune check: both models answer the same fixed prompts and score the same
    held-out text; the table holds both answers per prompt, the metrics both sides."""
    from forgeline_operators.evaluate.general import PROMPTS, after_finetune, general_check

    ctx = _ctx(assets, tmp_path)
    metrics = general_check(ctx, assets.tuned_dir, assets.base_dir, max_new_tokens=4)
    table = ctx.sink.tables["general/answers.json"]  # type: ignore[attr-defined]
    assert table["prompt"] == [p for p, _ in PROMPTS] and len(table["parent"]) == len(PROMPTS)
    assert table["parent"] != table["tuned"]  # two different models answered
    assert metrics["general_perplexity"] > 1 and metrics["general_parent_perplexity"] > 1
    assert metrics["general_perplexity_change"] == pytest.approx(
        metrics["general_perplexity"] / metrics["general_parent_perplexity"] - 1
    )
    itself = general_check(
        _ctx(assets, tmp_path / "again"), assets.base_dir, assets.base_dir, max_new_tokens=4
    )
    assert itself["general_perplexity_change"] == pytest.approx(0.0, abs=1e-9)
    assert itself["general_contains"] == itself["general_parent_contains"]

    # An adapter-only output (no config.json) has nothing to answer with: skipped, nothing logged.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    skip = _ctx(assets, tmp_path / "skip", base="${model}", general_check=True)
    assert after_finetune(skip, [adapter]) == {}
    assert skip.sink.tables == {}  # type: ignore[attr-defined]
    off = _ctx(assets, tmp_path / "off", base="${model}", general_check=False)
    assert after_finetune(off, [assets.tuned_dir]) == {}
