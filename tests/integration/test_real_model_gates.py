"""The gates on the real model (issue 17): the over-tuning that once passed every gate and promoted a
model answering "Capital of FranceCapital" now fails the quickstart's general-text gate, with the
metric, both values and the interval in the message; a quantization that truly hurts SmolLM2 (NNCF
int4 on every layer) is blocked by its gate while int8 passes.

Both run the shipped workflow through the real CLI (real Ray, MLflow and operators), on fewer steps
than the quickstart but a learning rate high enough to over-tune.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forgeline.artifacts import ModelStore
from forgeline.registry import default_registry

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "forgeline.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF converted once (~30 s) for both tests: the store's models/ folder, copied per home."""
    root = tmp_path_factory.mktemp("store")
    ModelStore(root, default_registry()).materialize("builtin://smollm2-135m-instruct")
    return root / "models"


@pytest.fixture
def real_home(home: Path, converted: Path) -> Path:
    shutil.copytree(converted, home / "artifacts" / "models")
    return home


def _run(workflow: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "run", str(workflow), "--home", str(home), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        env=ENV,
    )


def _quickstart_copy(tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / "wf"
    shutil.copytree(ROOT / "workflows" / "data", folder / "data")
    return folder / "quickstart.yaml", (ROOT / "workflows" / "quickstart.yaml").read_text()


def test_over_tuned_real_model_fails_the_general_ability_gate(tmp_path: Path, real_home: Path) -> None:
    path, text = _quickstart_copy(tmp_path)
    tuned = "training: {max_steps: 20, micro_batch_size: 8, lr: 5.0e-4, max_seq_len: 128, seed: 0}"
    assert tuned in text, "the quickstart's sft recipe changed: update this test"
    # Ten times the learning rate on fewer steps: the tasks are learnt and general text forgotten.
    text = text.replace(
        tuned, "training: {max_steps: 12, micro_batch_size: 8, lr: 5.0e-3, max_seq_len: 96, seed: 0}"
    )
    # Score the SFT model itself (DPO adds minutes and nothing this test needs).
    general = text.index("- name: eval-general")
    text = text[:general] + text[general:].replace(
        "${stages.align.outputs.merged}", "${stages.sft.outputs.merged}", 1
    )
    path.write_text(text)

    result = _run(path, real_home, "--only", "eval-general")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    # The message names the gate, the metric, both values, the relative change and its interval.
    match = re.search(
        r"gate max_regression_vs=base failed: perplexity ([\d.]+) vs base ([\d.]+): ([\d.]+)% worse, "
        r"95% interval of the regression \[([+-][\d.]+)%, ([+-][\d.]+)%\]",
        out,
    )
    assert match, out
    tuned_ppl, base_ppl, change, low, high = (float(g) for g in match.groups())
    assert tuned_ppl > 1.15 * base_ppl
    assert low <= change <= high and high > 15.0


QUANT_WORKFLOW = """\
name: real-model-quantization-gates
model: {base: builtin://smollm2-135m-instruct}
data: {corpus: {path: data/corpus_sample.jsonl, format: text}}
resources: {device: cpu, cpus_per_stage: 1}
stages:
  - name: int8
    kind: quantize
    format: nncf_int8
    calibration: {dataset: corpus, samples: 16, max_seq_len: 256}
    gate: {max_perplexity_increase: 0.02, min_token_agreement: 0.9}
  - name: int4
    kind: quantize
    format: nncf_int4
    calibration: {dataset: corpus, samples: 16, max_seq_len: 256}
    gate: {max_perplexity_increase: 0.02, min_token_agreement: 0.9}
    needs: [int8]
"""


def test_int4_that_hurts_the_real_model_is_blocked_and_int8_passes(tmp_path: Path, real_home: Path) -> None:
    folder = tmp_path / "wf"
    shutil.copytree(ROOT / "workflows" / "data", folder / "data")
    path = folder / "quant.yaml"
    path.write_text(QUANT_WORKFLOW)

    result = _run(path, real_home)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    match = re.search(
        r"nncf_int4: gate max_perplexity_increase=0.02 failed: perplexity ([\d.]+) is ([\d.]+)% above "
        r"the parent's ([\d.]+)",
        out,
    )
    assert match, out
    assert float(match.group(2)) > 10.0  # not a near miss: int4 on every layer truly hurts
    status = subprocess.run(
        [*CLI, "status", "--home", str(real_home)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    int8_row = next(line for line in status.stdout.splitlines() if "│ int8 " in line)
    assert "succeeded" in int8_row, status.stdout
