"""Test operators (importable by Ray workers): they record each call so tests can count executions.

Every call appends ``<stage>`` to ``calls.log`` beside the stage's dataset, so a test sees exactly
which operators ran. They produce real published outputs through the real runtime.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from forgeline.registry import Capabilities, OperatorRegistry, OperatorSpec
from forgeline.runtime.context import OperatorError, StageContext, StageResult


def _log_call(ctx: StageContext, what: str = "") -> Path:
    base = next(iter(ctx.datasets.values())).path.parent  # the test's own directory
    with open(base / "calls.log", "a") as f:
        f.write(f"{ctx.stage.name}{what}\n")
    return base


def echo(ctx: StageContext) -> StageResult:
    """Writes a 'report' whose content depends on params and inputs (deterministic)."""
    _log_call(ctx)
    stage = ctx.stage
    model_dir = ctx.input_path(stage.model)
    upstream = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    report = ctx.output_dir / "report"
    report.mkdir()
    content = {"stage_params": stage.max_samples, "upstream_files": upstream}
    if os.environ.get("FORGELINE_TEST_NONDETERMINISTIC"):
        content["t"] = time.time()
    (report / "metrics.json").write_text(json.dumps(content, sort_keys=True))
    # A stand-in "model" directory downstream stages can consume (a config.json like a checkpoint).
    (report / "config.json").write_text(json.dumps({"from": stage.name}))
    ctx.log_metrics({"perplexity": float(stage.max_samples or 1)})
    return StageResult(outputs={"report": report}, metrics={"perplexity": float(stage.max_samples or 1)})


def pid_checkpoint(ctx: StageContext) -> StageResult:
    """A finetune-like operator that records the worker process it ran in (``stage:pid`` in pids.log)."""
    base = next(iter(ctx.datasets.values())).path.parent
    with open(base / "pids.log", "a") as f:
        f.write(f"{ctx.stage.name}:{os.getpid()}\n")
    out = ctx.output_dir / "checkpoint"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"from": ctx.stage.name}))
    return StageResult(outputs={"checkpoint": out}, metrics={})


def slow(ctx: StageContext) -> StageResult:
    """Records that it started, then waits (bounded) for a 'release' file next to the dataset."""
    base = _log_call(ctx, ":started")
    (base / "slow.pid").write_text(str(os.getpid()))
    deadline = time.time() + 120
    while time.time() < deadline:
        if (base / "release").exists():
            break
        time.sleep(0.1)
    _log_call(ctx, ":finished")
    name = type(ctx.stage).outputs[0]  # whatever kind it stands in for
    out = ctx.output_dir / name
    out.mkdir()
    (out / "done.txt").write_text("ok")
    return StageResult(outputs={name: out}, metrics={"waited": 1.0})


def version(ctx: StageContext) -> StageResult:
    """A register-like operator: a plain value output, no directories."""
    _log_call(ctx)
    return StageResult(
        outputs={"version": 1, "model_uri": "models:/x/1"}, metrics={"registered_version": 1.0}
    )


def fail(ctx: StageContext) -> StageResult:
    _log_call(ctx)
    print("progress line printed by a library")
    raise OperatorError("this stage always fails (test operator)")


def registry(kinds: dict[str, str] | None = None) -> OperatorRegistry:
    """Map stage kinds to test operators, e.g. {"evaluate": "echo", "register": "fail"}."""
    from forgeline.registry import default_registry

    mapping = {"evaluate": "echo", **(kinds or {})}
    reg = OperatorRegistry(models=default_registry().models())
    for kind, fn in mapping.items():
        reg.add_operator(
            OperatorSpec(kind=kind, entrypoint=f"opkit:{fn}", version="test-1", capabilities=Capabilities())
        )
    return reg
