"""The NeMo trainers' console output → metrics at the trainer's steps, logged once each.

The golden logs under tests/data/golden/nemo/ were written with the trainers' own format strings
(Megatron-Bridge v0.5.0 ``training/utils/train_utils.py`` ``training_log`` and ``training/eval.py``;
NeMo-RL v0.7.0 ``algorithms/dpo.py``), with made-up values.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from forgeline_operators.finetune.nemo.kube_launch import _fixed_width
from forgeline_operators.finetune.nemo.metrics import BridgeParser, DpoParser, MetricTail

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "nemo"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(step, m[name]) for m, step in self.calls if name in m]


def test_bridge_training_and_validation_lines() -> None:
    lines = (GOLDEN / "bridge_v0.5.0.log").read_text().splitlines()
    got = [e for line in lines for e in BridgeParser().feed(line)]
    assert [step for step, _ in got] == [10, 20, 20, 30]
    first = got[0][1]
    assert first["loss"] == pytest.approx(2.25)
    assert first["grad_norm"] == pytest.approx(1.15)
    assert first["learning_rate"] == pytest.approx(2.5e-5)
    assert first["iteration_time_ms"] == pytest.approx(1530.4)
    assert first["tflops_per_gpu"] == pytest.approx(412.3)
    assert first["global_batch_size"] == 128 and first["consumed_samples"] == 1280
    assert got[2][1] == pytest.approx({"eval_loss": 1.91, "eval_perplexity": 6.753089})
    # the memory report and other lines with '|' are not metrics
    assert BridgeParser().feed("[Rank 0] (after 1 iterations) memory (GB) | allocated: 61.2") == []


def test_bridge_line_behind_a_ray_or_pod_prefix() -> None:
    line = (GOLDEN / "bridge_v0.5.0.log").read_text().splitlines()[2]
    assert BridgeParser().feed(f"(RayTrainWorker pid=4242, ip=10.0.0.3) {line}")[0][0] == 10


def test_dpo_steps_are_global_across_epochs_and_blocks_map_to_trl_names() -> None:
    parser = DpoParser()
    got = [
        e for line in (GOLDEN / "nemo_rl_dpo_v0.7.0.log").read_text().splitlines() for e in parser.feed(line)
    ]
    got += parser.close()
    train = [(s, m) for s, m in got if "loss" in m]
    assert [s for s, _ in train] == [1, 2, 3, 4]  # epoch 2, step 1 is global step 3
    step3 = dict(train)[3]
    assert step3["loss"] == pytest.approx(0.55)
    assert step3["dpo_loss"] == pytest.approx(0.55)
    assert step3["rewards/accuracies"] == pytest.approx(0.8)
    assert step3["rewards/margins"] == pytest.approx(0.03 + 0.06)
    val = [(s, m) for s, m in got if "eval_loss" in m]
    assert [s for s, _ in val] == [3]
    assert val[0][1]["eval_loss"] == pytest.approx(0.56)
    assert val[0][1]["eval_rewards/accuracies"] == pytest.approx(0.81)


def test_tail_logs_each_step_once_in_batches_across_overlapping_reads() -> None:
    lines = (GOLDEN / "bridge_v0.5.0.log").read_text().splitlines()
    rec = Recorder()
    tail = MetricTail("megatron-bridge", rec, flush_every_s=3600)
    tail.feed(lines[:4])
    assert rec.calls == []  # batched: nothing before a flush
    tail.feed(lines[1:])  # a re-read that overlaps what was fed
    tail.flush(final=True)
    assert [step for _, step in rec.calls] == [10, 20, 30]
    assert rec.series("loss") == [
        (10, pytest.approx(2.25)),
        (20, pytest.approx(2.0)),
        (30, pytest.approx(1.75)),
    ]
    assert rec.series("eval_loss") == [(20, pytest.approx(1.91))]
    tail.feed(lines)  # the whole log again (a restarted stream): nothing new
    tail.flush(final=True)
    assert len(rec.calls) == 3
    assert tail.logged == sum(len(m) for m, _ in rec.calls)


def test_tail_keeps_an_open_dpo_block_across_reads() -> None:
    lines = (GOLDEN / "nemo_rl_dpo_v0.7.0.log").read_text().splitlines()
    cut = lines.index("  • accuracy: 0.6000")  # a read ends inside step 1's results block
    rec = Recorder()
    tail = MetricTail("nemo-rl", rec, flush_every_s=0)  # flush after every read
    tail.feed(lines[:cut])
    tail.feed(lines[cut:])
    tail.flush(final=True)
    assert [s for s, _ in rec.series("rewards/accuracies")] == [1, 2, 3, 4]
    assert rec.series("loss")[0] == (1, pytest.approx(0.65))


def test_kubelet_timestamps_compare_as_text_once_fixed_width() -> None:
    a, b = _fixed_width("2026-11-28T21:00:05.1Z"), _fixed_width("2026-11-28T21:00:05.12Z")
    assert a < b and a == "2026-11-28T21:00:05.100000000Z"
