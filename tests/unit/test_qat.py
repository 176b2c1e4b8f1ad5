"""QAT on the finetune stage (hf, sft) with the shipped tiny Llama, in-process: ModelOpt int8 quantizers
calibrated on training rows, 30 training steps through them, the quantize stage's export, and PTQ vs
QAT perplexity on the same eval rows. ~5 s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from forgeline.artifacts import sha256_file
from forgeline.runtime.context import DatasetInput, GateFailed, MemorySink, StageContext
from forgeline.spec import Workflow
from forgeline_operators.finetune.operator import run
from forgeline_operators.finetune.spec import FinetuneStage
from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[2] / "workflows" / "data"
TRAINING = {"max_steps": 30, "micro_batch_size": 8, "max_seq_len": 64, "eval_fraction": 0.05, "lr": 3e-4}


def context(tmp: Path, qat: dict[str, Any], sink: MemorySink, steps: int = 30) -> StageContext:
    path = DATA / "chat_sft.jsonl"
    stage = {
        "name": "qat",
        "kind": "finetune",
        "method": "sft",
        "dataset": "sft",
        "training": {**TRAINING, "max_steps": steps},
        "qat": qat,
    }
    wf = Workflow.model_validate(
        {
            "name": "t",
            "model": {"base": "builtin://tiny-llama"},
            "data": {"sft": {"path": str(path), "format": "sft"}},
            "stages": [stage],
        }
    )
    (tmp / "out").mkdir(parents=True)
    (tmp / "work").mkdir()
    return StageContext(
        stage=wf.stages[0],
        workflow=wf,
        output_dir=tmp / "out",
        work_dir=tmp / "work",
        sink=sink,
        resolve=lambda ref: CHECKPOINT_DIR,
        values=lambda ref: None,
        datasets={"sft": DatasetInput("sft", path, "sft", sha256_file(path))},
        threads=1,
    )


def test_qat_trains_through_int8_quantizers_and_exports_like_ptq(tmp_path: Path) -> None:
    sink = MemorySink()
    result = run(context(tmp_path, {"format": "int8", "calibration_samples": 32}, sink))
    m = result.metrics
    assert m["final_loss"] < m["first_loss"]
    # PTQ (calibrated, untrained) and QAT (calibrated, trained) perplexity on the same eval rows.
    assert m["qat_perplexity"] < m["ptq_perplexity"]
    assert m["qat_perplexity"] == m["perplexity"] and m["parent_perplexity"] > 1
    assert 0 < m["token_agreement"] <= 1 and m["qat_calibration_rows"] == 32
    assert sink.last("ptq_perplexity") == m["ptq_perplexity"]
    assert sink.tags["forgeline.quantize.format"] == "int8"
    merged = result.outputs["merged"]
    assert isinstance(merged, Path)
    q = json.loads((merged / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "W8A8_SQ_PER_CHANNEL"  # what the quantize stage writes for int8
    assert (merged / "tokenizer.json").is_file()


def test_qat_gate_fails_with_numbers(tmp_path: Path) -> None:
    sink = MemorySink()
    with pytest.raises(GateFailed, match="min_token_agreement=1 failed"):
        run(context(tmp_path, {"format": "int8", "gate": {"min_token_agreement": 1.0}}, sink, steps=4))
    assert sink.last("token_agreement") is not None  # logged before the gate failed


def test_qat_settings_are_checked() -> None:
    base = {"name": "q", "kind": "finetune", "dataset": "d", "qat": {"format": "int8"}}
    with pytest.raises(ValidationError, match="backend 'hf' and method 'sft'"):
        FinetuneStage.model_validate({**base, "method": "lora"})
    with pytest.raises(ValidationError, match="one worker"):
        FinetuneStage.model_validate({**base, "method": "sft", "parallelism": {"dp": 2}})
    with pytest.raises(ValidationError, match="set eval_dataset instead"):
        FinetuneStage.model_validate(
            {**base, "method": "sft", "qat": {"format": "int8", "gate": {"dataset": "x"}}}
        )
