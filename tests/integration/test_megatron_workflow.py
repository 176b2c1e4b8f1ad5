"""``workflows/quickstart-parallel.yaml`` through the real driver: megatron-core LoRA at TP=2 x PP=2 on
four Ray Train workers (gloo), then evaluate on the published merged HF checkpoint.

The stage must publish HF formats only (a PEFT adapter that ``peft`` loads and a merged checkpoint),
log per-step metrics from rank 0 into its own MLflow run, and learn (final loss below the first; the
evaluate gate -- no regression against the base -- passes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from forgeline.runtime import RunSettings, run_workflow
from forgeline.spec import load_workflow

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "quickstart-parallel.yaml"


def test_quickstart_parallel_runs_tp2_pp2_and_evaluates(home: Path, ray_session: None) -> None:
    summary = run_workflow(load_workflow(WORKFLOW), RunSettings(home=home))
    sft, ev = summary.stages["sft"], summary.stages["eval-tuned"]
    assert sft.state == ev.state == "succeeded"
    assert sft.metrics["steps"] == 60 and sft.metrics["final_loss"] < sft.metrics["first_loss"]
    assert sft.record is not None and set(sft.record.outputs) == {"adapter", "merged"}
    adapter = sft.record.output_path("adapter")
    merged = sft.record.output_path("merged")
    assert adapter is not None and merged is not None
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert not list(merged.rglob("*.distcp"))  # no megatron formats out
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    # one point per step from rank 0 (the stage's closing summary repeats step 60)
    assert {m.step for m in client.get_metric_history(str(sft.run_id), "grad_norm")} == set(range(1, 61))
    assert client.get_run(str(sft.run_id)).data.params["world_size"] == "4"
