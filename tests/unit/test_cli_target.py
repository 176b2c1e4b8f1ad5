"""``forgeline run --target``: the override reaches the run (the workflow file is not changed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from forgeline.cli import app

QUICKSTART = Path(__file__).resolve().parents[2] / "workflows" / "quickstart-tiny.yaml"


@pytest.mark.parametrize(("flag", "expected"), [([], "local"), (["--target", "kubernetes"], "kubernetes")])
def test_run_target_override(
    flag: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import forgeline.runtime

    seen: dict[str, Any] = {}

    def fake_run_workflow(loaded: Any, settings: Any, **_: Any) -> None:
        seen["target"] = loaded.workflow.target
        raise KeyboardInterrupt  # stop before anything runs: the CLI reports a cancelled run

    monkeypatch.setattr(forgeline.runtime, "run_workflow", fake_run_workflow)
    res = CliRunner().invoke(app, ["run", str(QUICKSTART), "--home", str(tmp_path), *flag])
    assert res.exit_code == 130, res.output
    assert seen == {"target": expected}
    assert "target: kubernetes" not in QUICKSTART.read_text()


def test_run_target_rejects_unknown(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["run", str(QUICKSTART), "--home", str(tmp_path), "--target", "moon"])
    assert res.exit_code == 2 and "moon" in res.output
