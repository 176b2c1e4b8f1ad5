"""The finetune operator's logic without training: step schedule, durable checkpoints, tokenised
features (the same ids and masks ``evaluate`` scores), and what ``plan`` says about its layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forgeline.artifacts import StageStore
from forgeline.plan import Plan
from forgeline.runtime import make_planner
from forgeline.spec import load_workflow
from forgeline.spec._datasets import read_dataset
from forgeline_operators.data import IGNORE_INDEX, encode_row
from forgeline_operators.finetune import dpo
from forgeline_operators.finetune._checkpoints import (
    COMPLETE_MARKER,
    discard_incomplete,
    durable_dir,
    latest_complete,
    mark_complete,
    stage_key,
)
from forgeline_operators.finetune.operator import schedule
from forgeline_operators.finetune.spec import FinetuneStage
from forgeline_operators.lib.train_rows import sft_features
from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "workflows" / "data"


def _stage(**fields: object) -> FinetuneStage:
    return FinetuneStage.model_validate(
        {"name": "ft", "kind": "finetune", "method": "lora", "dataset": "d", **fields}
    )


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from forgeline_operators.lib.hf_checkpoint import load_tokenizer

    return load_tokenizer(CHECKPOINT_DIR)


# ----------------------------------------------------------------------------------------- schedule


def test_schedule_counts_optimizer_steps_like_the_trainer() -> None:
    s = schedule(_stage(training={"epochs": 2, "micro_batch_size": 8, "grad_accum": 2}), 100)
    # ceil(100 / 8) = 13 micro-batches -> ceil(13 / 2) = 7 steps per epoch.
    assert s.total_steps == 14
    assert s.save_steps == 3  # 5 checkpoints by default
    assert s.logging_steps == 1
    dp2 = schedule(_stage(training={"micro_batch_size": 4}, parallelism={"dp": 2}), 100)
    assert dp2.total_steps == schedule(_stage(training={"micro_batch_size": 8}), 100).total_steps == 13
    capped = schedule(_stage(training={"max_steps": 1000, "checkpoint_every_steps": 7}), 10)
    assert (capped.total_steps, capped.save_steps, capped.logging_steps) == (1000, 7, 20)


# -------------------------------------------------------------------------------------- checkpoints


def test_durable_dir_is_keyed_by_the_stage_store_key(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "artifacts")
    key = "ab12" * 16
    staging = store.staging(key)
    assert stage_key(staging) == key
    d = durable_dir(staging, {"ignored": True})
    assert d == store.stages_dir / ".finetune-checkpoints" / key
    # Another attempt at the same key (new pid/uuid) finds the same directory.
    assert durable_dir(store.staging(key), {}) == d
    # Outside a stage store: keyed by the identity given.
    plain = tmp_path / "out"
    assert durable_dir(plain, {"a": 1}) == durable_dir(plain, {"a": 1}) != durable_dir(plain, {"a": 2})


def test_only_marked_checkpoints_are_resumed_from(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    mark_complete(tmp_path / "checkpoint-2", {})
    mark_complete(tmp_path / "checkpoint-4", {"world_size": 1})
    assert latest_complete(tmp_path) == tmp_path / "checkpoint-4"  # 6 was being written at the crash
    assert json.loads((tmp_path / "checkpoint-4" / COMPLETE_MARKER).read_text())["step"] == 4
    assert not list(tmp_path.glob("checkpoint-4/*.tmp"))
    assert discard_incomplete(tmp_path) == ["checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert latest_complete(tmp_path / "missing") is None


# ----------------------------------------------------------------------------------------- features


def test_sft_features_are_the_evaluate_tokens(tokenizer: Any) -> None:
    rows = read_dataset(DATA / "chat_sft.jsonl", "sft")[:20]
    feats = sft_features(tokenizer, rows[:15], rows[15:], "sft", 64)
    assert (len(feats.train), len(feats.eval), feats.rows) == (15, 5, 20)
    want = encode_row(tokenizer, rows[0], "sft", 64)
    assert feats.train[0] == {"input_ids": want.input_ids, "labels": want.labels}
    assert feats.train[0]["labels"][0] == IGNORE_INDEX  # the prompt is not learned
    assert feats.train_tokens == sum(len(f["input_ids"]) for f in feats.train)


def test_over_long_rows_are_counted_and_rows_without_completion_dropped(tokenizer: Any) -> None:
    rows = read_dataset(DATA / "chat_sft.jsonl", "sft")[:10]
    prompt_lengths = [len(encode_row(tokenizer, r, "sft", 10_000).labels) for r in rows]
    cut = 12  # longer than some prompts, shorter than every full row
    feats = sft_features(tokenizer, rows, [], "sft", cut)
    assert feats.truncated_rows == sum(n > cut for n in prompt_lengths) == 10
    no_completion = sum(
        all(label == IGNORE_INDEX for label in encode_row(tokenizer, r, "sft", cut).labels[1:]) for r in rows
    )
    assert feats.dropped_rows == no_completion
    assert len(feats.train) == 10 - no_completion
    assert all(len(f["input_ids"]) <= cut for f in feats.train)


def test_dpo_features_share_the_prompt_and_match_the_sft_tokens(tokenizer: Any) -> None:
    rows = read_dataset(DATA / "prefs.jsonl", "preference")[:8]
    feats = dpo.features(tokenizer, rows, [], 64)
    assert len(feats.train) == 8 and feats.dropped_rows == 0
    row, f = rows[0], feats.train[0]
    chosen = encode_row(tokenizer, {"prompt": row["prompt"], "completion": row["chosen"]}, "sft", 64)
    assert f["prompt_ids"] + f["chosen_ids"] == chosen.input_ids
    assert chosen.labels[: len(f["prompt_ids"])] == [IGNORE_INDEX] * len(f["prompt_ids"])
    rejected = encode_row(tokenizer, {"prompt": row["prompt"], "completion": row["rejected"]}, "sft", 64)
    assert f["prompt_ids"] + f["rejected_ids"] == rejected.input_ids
    # tiny-llama has a chat template: each answer is an assistant turn ending "</s>\n" (graded: it stops).
    assert f["chosen_ids"][-2:] == f["rejected_ids"][-2:] == chosen.input_ids[-2:]
    assert tokenizer.eos_token_id in f["chosen_ids"][-2:]


# --------------------------------------------------------------------------------------------- plan

WORKFLOW = """\
name: ft
model: {{base: builtin://tiny-llama}}
data:
  sft: {{path: {data}/chat_sft.jsonl, format: sft}}
stages:
  - {{name: tune, kind: finetune, method: lora, dataset: sft, parallelism: {parallelism}}}
"""


def _plan(tmp_path: Path, parallelism: str) -> Plan:
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW.format(data=DATA, parallelism=parallelism))
    return make_planner(load_workflow(wf), tmp_path / "home").build()


def test_plan_rejects_tp_and_pp_for_backend_hf(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "{tp: 2, pp: 2, dp: 2}")
    problems = [str(p) for p in plan.problems()]
    assert any(
        "stages[0].parallelism.tp: backend 'hf' does not support tp > 1" in p and "megatron" in p
        for p in problems
    )
    assert any("parallelism.pp: backend 'hf' does not support pp > 1" in p for p in problems)
    assert not any("parallelism.dp" in p for p in problems)


def test_plan_gives_a_data_parallel_coordinator_no_resources(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "{dp: 2}")
    assert not plan.problems()
    tune = plan.stage("tune")
    assert tune.workers == 2 and tune.task_resources == (0.0, 0) and tune.total_cpus == 2
    assert tune.operator is not None
    assert tune.operator.entrypoint.endswith("finetune.operator:run")
    assert tune.memory is not None and tune.memory.per_device_bytes > 0
    single = _plan(tmp_path, "{dp: 1}").stage("tune")
    assert single.workers == 0 and single.task_resources == (1, 0)


def test_a_malformed_dataset_is_reported_by_row_before_anything_runs(tmp_path: Path) -> None:
    from forgeline.spec import WorkflowError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "name: ft\nmodel: {base: builtin://tiny-llama}\n"
        "data: {prefs: {path: bad.jsonl, format: preference}}\n"
        "stages:\n  - {name: align, kind: finetune, method: dpo, dataset: prefs}\n"
    )
    with pytest.raises(WorkflowError) as info:
        load_workflow(wf)  # what `forgeline validate|plan|run` do first: no Ray, no worker, no training
    assert f"{bad}:2" in str(info.value) and "prefs[1].rejected: missing required key 'rejected'" in str(
        info.value
    )


def test_plan_gives_gpu_workers_the_gpus_not_the_coordinator(tmp_path: Path) -> None:
    wf = tmp_path / "gpu.yaml"
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    wf.write_text(
        "name: g\nmodel: {base: builtin://tiny-llama}\nresources: {device: gpu}\n"
        "data: {d: {path: d.jsonl, format: sft}}\n"
        "stages:\n  - {name: tune, kind: finetune, method: lora, dataset: d, parallelism: {dp: 4}}\n"
    )
    from forgeline.artifacts import ModelStore, StageStore
    from forgeline.plan import Planner
    from forgeline.registry import default_registry
    from forgeline.spec import load_workflow

    reg = default_registry()
    tune = (
        Planner(load_workflow(wf), reg, ModelStore(tmp_path, reg), StageStore(tmp_path)).build().stage("tune")
    )
    assert tune.gpus == 4 and tune.workers == 4
    assert tune.task_resources == (0.0, 0)  # the 4 Ray Train workers take one GPU each
