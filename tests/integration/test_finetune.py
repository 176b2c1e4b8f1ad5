"""The finetune operator in the real runtime: Ray tasks, Ray Train workers, MLflow on SQLite.

dp=2 over Ray Train (gloo, 2 CPU workers on the 2-CPU embedded cluster, the stage's own task holding
none) must reach the same losses as dp=1 with the same global batch: the same samples per optimizer
step, gradients averaged over the same tokens. Tolerance: relative 1e-5 on the train loss and the last
logged step loss (measured: ~1e-7, float summation order). Placement that cannot happen fails with the
numbers; placement that is only busy fails after the timeout instead of waiting forever.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from forgeline.runtime import RunSettings, StageFailed, run_workflow
from forgeline.runtime.context import OperatorError
from forgeline.spec import load_workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DATA = Path(__file__).resolve().parents[2] / "workflows" / "data"
TRAINING = "max_steps: 24, max_seq_len: 64, lr: 1.0e-3, eval_fraction: 0.05, checkpoint_every_steps: 12"
WORKFLOW = f"""\
name: ft-dp
model: {{base: builtin://tiny-llama}}
data:
  sft: {{path: {DATA}/chat_sft.jsonl, format: sft}}
stages:
  - name: dp1
    kind: finetune
    method: sft
    dataset: sft
    training: {{micro_batch_size: 8, {TRAINING}}}
  - name: dp2
    kind: finetune
    method: sft
    dataset: sft
    parallelism: {{dp: 2}}
    training: {{micro_batch_size: 4, {TRAINING}}}
"""


@pytest.mark.slow
def test_dp2_over_ray_train_matches_dp1_with_the_same_global_batch(
    tmp_path: Path, home: Path, ray_session: None
) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW)
    summary = run_workflow(load_workflow(wf), RunSettings(home=home))
    one, two = summary.stages["dp1"], summary.stages["dp2"]
    assert one.state == two.state == "succeeded"
    assert two.metrics["steps"] == one.metrics["steps"] == 24
    for name in ("train_loss", "final_loss", "first_loss"):
        assert two.metrics[name] == pytest.approx(one.metrics[name], rel=1e-5), name
    assert two.metrics["final_loss"] < two.metrics["first_loss"]
    assert two.record is not None and {"merged", "checkpoint"} <= set(two.record.outputs)
    # Rank 0 of the Ray Train run logged per-step metrics into the stage's own MLflow run.
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    history = client.get_metric_history(str(two.run_id), "loss")
    assert sorted(m.step for m in history)[:3] == [1, 2, 3] and len(history) >= 24
    assert client.get_metric_history(str(two.run_id), "tokens_per_second")
    run = client.get_run(str(two.run_id))
    assert run.data.params["global_batch"] == "8" and run.data.metrics["resumed_from_step"] == 0


@pytest.mark.slow
def test_dp_beyond_the_cluster_fails_with_the_numbers(tmp_path: Path, home: Path, ray_session: None) -> None:
    wf = tmp_path / "wf.yaml"
    dp3 = WORKFLOW.replace("dp: 2", "dp: 3")
    wf.write_text(dp3[: dp3.index("  - name: dp1")] + dp3[dp3.index("  - name: dp2") :])
    with pytest.raises(StageFailed) as info:
        run_workflow(load_workflow(wf), RunSettings(home=home))
    failed = info.value.summary.stages["dp2"]
    assert failed.state == "failed"
    # The driver refuses before starting the stage's task: dp=3 workers need 3 CPUs, Ray has 2.
    assert "needs 3 CPU (3 Ray Train workers x 1 CPU) but the Ray cluster has 2 CPU" in (failed.error or "")


@pytest.mark.slow
def test_a_busy_cluster_times_out_instead_of_waiting_forever(tmp_path: Path, ray_session: None) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from forgeline_operators.finetune._ray_train import DataParallel, run_data_parallel

    hog = placement_group([{"CPU": 1}, {"CPU": 1}])  # every CPU of the session cluster
    ray.get(hog.ready(), timeout=60)
    try:
        with pytest.raises(OperatorError, match=r"were not placed within 3 s: the cluster is busy"):
            job = SimpleNamespace(stage=SimpleNamespace(name="busy"))  # never reaches a worker
            run_data_parallel(job, DataParallel(2, 1, False, 3), tmp_path)  # type: ignore[arg-type]
    finally:
        remove_placement_group(hog)
