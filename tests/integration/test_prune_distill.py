"""workflows/examples/prune-distill-cpu.yaml on the real runtime (Ray tasks, MLflow on SQLite) with the
real operators: prune the tiny Llama's MLP and heads, then distill the original into the pruned model.
The recovery must be measurable in MLflow: the student ends closer to the teacher than it started."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig

from forgeline.runtime import RunSettings, run_workflow
from forgeline.spec import load_workflow
from forgeline.tracking import Tracker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def test_prune_then_distill_recovers_and_logs_before_after(home: Path, ray_session: None) -> None:
    summary = run_workflow(
        load_workflow(ROOT / "workflows" / "examples" / "prune-distill-cpu.yaml"), RunSettings(home=home)
    )
    assert summary.state == "FINISHED"
    assert {name: o.state for name, o in summary.stages.items()} == {
        "prune": "succeeded",
        "recover": "succeeded",
    }
    student = summary.stages["recover"].record.output_path("checkpoint")  # type: ignore[union-attr]
    config = AutoConfig.from_pretrained(str(student))
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (256, 2, 2)

    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}")
    parent = tracker.get_run(summary.run_id)
    runs = {
        c.data.tags["forgeline.stage"]: c.data
        for c in tracker.child_runs(parent.info.experiment_id, summary.run_id)
    }
    prune, recover = runs["prune"].metrics, runs["recover"].metrics
    assert prune["params_after"] < prune["params_before"]
    assert prune["perplexity_after"] > prune["perplexity_before"]
    assert runs["prune"].params["pruned.intermediate_size"] == "256"
    # The distill stage's starting point is the pruned model; training moves it towards the teacher.
    assert recover["student_params"] == prune["params_after"]
    assert recover["eval_kl"] < recover["initial_eval_kl"]
    assert recover["eval_perplexity"] < recover["initial_eval_perplexity"]
    assert "kl" in recover and recover["teacher_params"] == prune["params_before"]
