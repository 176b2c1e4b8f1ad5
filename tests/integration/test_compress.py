"""workflows/examples/compress-cpu.yaml on the real runtime (Ray, MLflow SQLite) with the real operators:
NNCF int4 quantize gated against the parent, OpenVINO build, ModelOpt int8_sq with a TP=2 TRT-LLM export."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeline.runtime import RunSettings, run_workflow
from forgeline.spec import load_workflow
from forgeline.tracking import Tracker

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]


def test_compress_cpu_example_runs_and_logs_the_gate(home: Path, ray_session: None) -> None:
    summary = run_workflow(
        load_workflow(ROOT / "workflows" / "examples" / "compress-cpu.yaml"), RunSettings(home=home)
    )
    assert summary.state == "FINISHED"
    assert {name: o.state for name, o in summary.stages.items()} == {
        "q-int4": "succeeded",
        "ir": "succeeded",
        "q-int8-modelopt": "succeeded",
    }
    ir = summary.stages["ir"].record
    assert ir is not None and (ir.output_path("artifact") / "openvino_tokenizer.xml").is_file()  # type: ignore[operator]
    trt = summary.stages["q-int8-modelopt"].record.output_path("trtllm_checkpoint")  # type: ignore[union-attr]
    assert sorted(p.name for p in trt.iterdir()) == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}")
    parent = tracker.get_run(summary.run_id)
    runs = {
        c.data.tags["forgeline.stage"]: c
        for c in tracker.child_runs(parent.info.experiment_id, summary.run_id)
    }
    metrics = runs["q-int4"].data.metrics
    assert metrics["perplexity_increase"] <= 0.05 and metrics["token_agreement"] >= 0.8
    assert metrics["size_ratio"] < 0.2
