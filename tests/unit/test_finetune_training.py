"""The finetune operator really training the shipped tiny Llama, in-process (dp=1), seconds per run.

Each method is judged by an independent measurement, not by the trainer's own log: completion
loss on ``held_out.jsonl`` before and after (scored with ``forgeline_operators.data`` exactly like
``evaluate``), the chosen-vs-rejected log-prob margin on preference pairs never trained on, merged
logits against adapter-on-base logits. Resume is checked by crashing a run after a checkpoint and
comparing the resumed run with an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from forgeline.artifacts import sha256_file
from forgeline.runtime.context import DatasetInput, MemorySink, OperatorError, StageContext, StageResult
from forgeline.spec import Workflow
from forgeline.spec._datasets import read_dataset
from forgeline_operators.data import IGNORE_INDEX, collate, encode_row, encode_rows
from forgeline_operators.finetune._checkpoints import COMPLETE_MARKER
from forgeline_operators.finetune.operator import run
from forgeline_operators.lib.hf_checkpoint import load_tokenizer
from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[2] / "workflows" / "data"
FAST = {"max_steps": 30, "micro_batch_size": 8, "max_seq_len": 64, "eval_fraction": 0.05, "seed": 0}


def _dataset(name: str, path: Path, fmt: str) -> DatasetInput:
    return DatasetInput(name, path, fmt, sha256_file(path))


def _ctx(
    tmp: Path,
    stage: Mapping[str, Any],
    sink: MemorySink | None = None,
    datasets: Sequence[DatasetInput] = (),
    attempt: str = "a",
    models: Mapping[str, Path] | None = None,
) -> StageContext:
    default = [
        _dataset("sft", DATA / "chat_sft.jsonl", "sft"),
        _dataset("prefs", DATA / "prefs.jsonl", "preference"),
    ]
    inputs = {d.name: d for d in [*default, *datasets]}
    body = {"name": "tune", "kind": "finetune", **stage}
    wf = Workflow.model_validate(
        {
            "name": "t",
            "model": {"base": "builtin://tiny-llama"},
            "data": {n: {"path": str(d.path), "format": d.format} for n, d in inputs.items()},
            "stages": [body],
        }
    )
    out, work = tmp / f"out-{attempt}", tmp / f"work-{attempt}"
    out.mkdir(parents=True)
    work.mkdir()
    return StageContext(
        stage=wf.stages[0],
        workflow=wf,
        output_dir=out,
        work_dir=work,
        sink=sink or MemorySink(),
        resolve=lambda ref: (models or {}).get(ref, CHECKPOINT_DIR),
        values=lambda ref: None,
        datasets=inputs,
        threads=1,
    )


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(CHECKPOINT_DIR)


def _model(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def completion_loss(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]]) -> float:
    """Token-weighted NLL of the graded (completion) tokens, the way ``evaluate`` scores them."""
    examples = encode_rows(tokenizer, rows, "sft", 64).examples
    nll, tokens = 0.0, 0
    for i in range(0, len(examples), 16):
        batch = collate(examples[i : i + 16], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll += float(F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
    return nll / tokens


@torch.no_grad()
def pair_margin(model: Any, tokenizer: Any, pairs: Sequence[Mapping[str, str]]) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt)."""

    def logp(row: Mapping[str, str], side: str) -> float:
        e = encode_row(tokenizer, {"prompt": row["prompt"], "completion": row[side]}, "sft", 64)
        ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])[:, 1:]
        logits = model(input_ids=ids).logits[:, :-1]
        return -float(F.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))

    return sum(logp(p, "chosen") - logp(p, "rejected") for p in pairs) / len(pairs)


def _steps(sink: MemorySink, name: str) -> list[tuple[int, float]]:
    return [(step, m[name]) for m, step in sink.metrics if name in m and step is not None]


def _check_step_metrics(sink: MemorySink) -> None:
    losses = _steps(sink, "loss")
    assert len(losses) >= 10 and [s for s, _ in losses] == sorted(s for s, _ in losses)
    for name in ("grad_norm", "learning_rate", "tokens_per_second"):
        assert _steps(sink, name), f"no per-step {name}"
    assert all(v > 0 for _, v in _steps(sink, "tokens_per_second"))
    assert sink.last("eval_loss") is not None


@pytest.fixture(scope="module")
def held_out() -> list[dict[str, Any]]:
    return read_dataset(DATA / "held_out.jsonl", "sft")


@pytest.fixture(scope="module")
def base_loss(tokenizer: Any, held_out: list[dict[str, Any]]) -> float:
    return completion_loss(_model(CHECKPOINT_DIR), tokenizer, held_out)


def _dirs(result: StageResult) -> dict[str, list[str]]:
    return {k: sorted(p.name for p in Path(str(v)).iterdir()) for k, v in result.outputs.items()}


def test_full_sft_lowers_held_out_loss(
    tmp_path: Path, tokenizer: Any, held_out: list[dict[str, Any]], base_loss: float
) -> None:
    sink = MemorySink()
    result = run(_ctx(tmp_path, {"method": "sft", "dataset": "sft", "training": {**FAST, "lr": 3e-4}}, sink))
    dirs = _dirs(result)
    assert set(dirs) == {"merged", "checkpoint"}
    assert "model.safetensors" in dirs["merged"] and "tokenizer.json" in dirs["merged"]
    assert {"optimizer.pt", "trainer_state.json", COMPLETE_MARKER} <= set(dirs["checkpoint"])
    after = completion_loss(_model(Path(str(result.outputs["merged"]))), tokenizer, held_out)
    assert after < base_loss - 1.0, (base_loss, after)
    assert result.metrics["final_loss"] < result.metrics["first_loss"]
    assert result.metrics["steps"] == 30 and result.metrics["resumed_from_step"] == 0
    _check_step_metrics(sink)
    # The durable checkpoint directory is gone once its last checkpoint moved into the outputs.
    assert not any((tmp_path / ".finetune-checkpoints").iterdir())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[StageResult, MemorySink]:
    stage = {
        "method": "lora",
        "dataset": "sft",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "training": {**FAST, "lr": 2e-3},
    }
    sink = MemorySink()
    return run(_ctx(tmp_path_factory.mktemp("lora"), stage, sink)), sink


def test_lora_lowers_loss_and_merge_equals_adapter_on_base(
    lora_run: tuple[StageResult, MemorySink], tokenizer: Any, held_out: list[dict[str, Any]], base_loss: float
) -> None:
    result, sink = lora_run
    assert set(result.outputs) == {"adapter", "merged", "checkpoint"}
    adapter, merged = Path(str(result.outputs["adapter"])), Path(str(result.outputs["merged"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(CHECKPOINT_DIR) and config["r"] == 8
    merged_model = _model(merged)
    after = completion_loss(merged_model, tokenizer, held_out)
    assert after < base_loss - 1.0, (base_loss, after)
    on_base = PeftModel.from_pretrained(_model(CHECKPOINT_DIR), str(adapter)).eval()
    batch = collate(encode_rows(tokenizer, held_out[:16], "sft", 64).examples, tokenizer.pad_token_id)
    with torch.no_grad():
        a = on_base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = merged_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (a - b).abs().max().item() < 1e-4
    _check_step_metrics(sink)


def test_dpo_continues_an_adapter_given_as_base(
    tmp_path: Path, lora_run: tuple[StageResult, MemorySink], tokenizer: Any
) -> None:
    sft_adapter = Path(str(lora_run[0].outputs["adapter"]))
    stage = {
        "method": "dpo",
        "base": "${stages.sft.outputs.adapter}",
        "dataset": "prefs",
        "lora": {"r": 8},
        "training": {**FAST, "max_steps": 10, "lr": 2e-3},
    }
    result = run(_ctx(tmp_path, stage, models={"${stages.sft.outputs.adapter}": sft_adapter}))
    adapter, merged = Path(str(result.outputs["adapter"])), Path(str(result.outputs["merged"]))
    # The same adapter trained further, still on the shipped base; the reference was its start.
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        CHECKPOINT_DIR
    )
    rows = [json.loads(r) for r in (DATA / "prefs.jsonl").read_text().splitlines()[:20]]
    start = PeftModel.from_pretrained(_model(CHECKPOINT_DIR), str(sft_adapter)).eval()
    assert pair_margin(_model(merged), tokenizer, rows) > pair_margin(start, tokenizer, rows)


def test_qlora_trains_on_a_4bit_base(
    tmp_path: Path, tokenizer: Any, held_out: list[dict[str, Any]], base_loss: float
) -> None:
    stage = {
        "method": "qlora",
        "dataset": "sft",
        "lora": {"r": 8, "alpha": 16},
        "training": {**FAST, "lr": 2e-3},
    }
    result = run(_ctx(tmp_path, stage))
    assert result.metrics["quantized_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down) in NF4
    assert result.metrics["final_loss"] < result.metrics["first_loss"]
    after = completion_loss(_model(Path(str(result.outputs["merged"]))), tokenizer, held_out)
    assert after < base_loss - 1.0, (base_loss, after)


def test_dpo_raises_the_margin_on_held_out_pairs(tmp_path: Path, tokenizer: Any) -> None:
    rows = (DATA / "prefs.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:250]) + "\n")
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows[250:]) + "\n")
    datasets = [
        _dataset("ptrain", tmp_path / "train.jsonl", "preference"),
        _dataset("pheld", tmp_path / "pairs.jsonl", "preference"),
    ]
    stage = {
        "method": "dpo",
        "dataset": "ptrain",
        "eval_dataset": "pheld",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "dpo": {"beta": 0.1},
        "training": {**FAST, "lr": 2e-3},
    }
    sink = MemorySink()
    result = run(_ctx(tmp_path, stage, sink, datasets))
    pairs = [json.loads(r) for r in rows[250:]]
    before = pair_margin(_model(CHECKPOINT_DIR), tokenizer, pairs)
    after = pair_margin(_model(Path(str(result.outputs["merged"]))), tokenizer, pairs)
    assert after > before + 0.5, (before, after)
    assert result.metrics["final_loss"] < result.metrics["first_loss"]
    assert result.metrics["eval_rewards/margins"] > 0
    assert result.metrics["eval_rewards/accuracies"] > 0.5
    assert _steps(sink, "rewards/margins") and _steps(sink, "rewards/accuracies")


class _Crash(MemorySink):
    """A sink whose process 'dies' when step ``at`` is logged (after the checkpoint before it)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step == self.at:
            raise KeyboardInterrupt("simulated crash")
        super().log_metrics(metrics, step)


def test_a_rerun_resumes_from_the_last_complete_checkpoint(tmp_path: Path) -> None:
    stage = {
        "method": "lora",
        "dataset": "sft",
        "training": {**FAST, "max_steps": 12, "checkpoint_every_steps": 5, "lr": 2e-3},
    }
    whole = run(_ctx(tmp_path / "whole", stage))
    with pytest.raises(KeyboardInterrupt):
        run(_ctx(tmp_path, stage, _Crash(at=8), attempt="1"))
    sink = MemorySink()
    resumed = run(_ctx(tmp_path, stage, sink, attempt="2"))
    assert resumed.metrics["resumed_from_step"] == 5
    assert next(s for s, _ in _steps(sink, "loss")) == 6  # continues after the checkpoint, not from 1
    assert resumed.metrics["steps"] == 12
    # Restored optimizer, scheduler, RNG and data order: the same run as one never interrupted.
    assert resumed.metrics["final_loss"] == pytest.approx(whole.metrics["final_loss"], rel=1e-5)


def test_malformed_rows_fail_with_row_numbers_before_training(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n{"prompt": "", "completion": "x"}\n')
    stage = {"method": "lora", "dataset": "bad", "training": FAST}
    with pytest.raises(OperatorError) as info:
        run(_ctx(tmp_path, stage, datasets=[_dataset("bad", bad, "sft")]))
    message = str(info.value)
    assert f"{bad}:2" in message and "bad[1].completion: missing required key 'completion'" in message
    assert f"{bad}:3" in message and "bad[2].prompt: must not be empty" in message
    assert not (tmp_path / ".finetune-checkpoints").exists()
