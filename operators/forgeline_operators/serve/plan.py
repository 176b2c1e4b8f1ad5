"""Plan hooks of the serve kind: the engine it will use, checked and shown before anything runs.

A named ``engine`` must be installed and run on the workflow's device (a plan problem naming the
installed engines otherwise). Without one, the plan says how the choice is made at run time: a build
stage's artifact keeps its engine; a checkpoint gets the one engine for the device. Imports only the
engines facade (no engine runtime).
"""

from __future__ import annotations

from typing import Any

from forgeline.sdk import Capabilities, StageIssue, parse_ref
from forgeline_operators.engines import EngineError, default_engines

__all__ = ["check", "describe"]


def check(stage: Any, workflow: Any, caps: Capabilities) -> list[StageIssue]:
    engines = default_engines()
    device = workflow.resources.device
    if stage.engine is None:
        return []
    try:
        engine = engines.get(stage.engine)
    except EngineError as e:
        return [StageIssue(str(e), field="engine", hint=f"use one of: {', '.join(engines.names())}")]
    if device not in engine.capabilities.devices:
        runs_on = "/".join(sorted(engine.capabilities.devices))
        fits = [e.name for e in engines if device in e.capabilities.devices]
        return [
            StageIssue(
                f"engine {engine.name!r} runs on {runs_on}, not on the workflow's device {device}",
                field="engine",
                hint=f"set resources.device: {runs_on}" + (f" or engine: {fits[0]}" if fits else ""),
            )
        ]
    return []


def describe(stage: Any, workflow: Any) -> list[str]:
    device = workflow.resources.device
    if stage.engine is not None:
        return [f"engine: {stage.engine} (given)"]
    on_device = [e.name for e in default_engines() if device in e.capabilities.devices]
    default = on_device[0] if len(on_device) == 1 else None
    parsed = parse_ref(stage.model)
    source = f"stage {parsed[0]!r}'s output" if parsed and parsed[0] != "model" else "the model"
    if default:
        fallback = f"else {default}, the engine for {device}"
    else:
        fallback = f"else one of {on_device} (set engine:)"
    return [f"engine: chosen at run time: the engine whose artifact {source} is, {fallback}"]
