"""``run(ctx)`` of the serve stage: a Triton model repository for the stage's model, by its engine.

The engine registry (:func:`forgeline_operators.engines.default_engines`) picks the engine once: the
one whose artifact the model is (a build stage's output), else the one engine that runs on the
workflow's ``resources.device`` (an HF checkpoint: OpenVINO on cpu, exported to an fp32 IR inside
this stage; TensorRT-LLM's llmapi model on gpu). The engine checks the stage's settings before any
work, prepares its artifact (and the ``speculative.draft`` model's), and writes the repository; the
repository's engine and the engine's own choices are logged as the stage's params. LoRA adapters
(``adapters:``) are served by name by the engines that can.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline_operators.engines import EngineError, ServingSettings, default_engines

__all__ = ["run"]


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    source = ctx.input_path(stage.model)
    device = ctx.workflow.resources.device
    try:
        engine = default_engines().select(source, device, name=stage.engine)
    except EngineError as e:
        raise OperatorError(f"serve stage {stage.name!r}: {e}") from None
    if device not in engine.capabilities.devices:
        ctx.logger.warning(
            "%s is %s's artifact, which runs on %s, not on the workflow's device %s",
            source,
            engine.name,
            "/".join(sorted(engine.capabilities.devices)),
            device,
        )
    name = stage.name.replace("-", "_")
    adapters = _adapters(ctx, name)
    spec = stage.speculative
    settings = ServingSettings(
        name=name,
        scheduler=stage.scheduler,
        threads=ctx.threads,
        adapters=adapters,
        draft=source if spec is not None else None,  # a placeholder until the draft is prepared
        num_assistant_tokens=spec.num_assistant_tokens if spec is not None else 5,
    )
    try:
        engine.check(settings)
    except ValueError as e:
        raise OperatorError(f"serve stage {stage.name!r}: {e}") from None
    started = time.perf_counter()
    artifact = engine.prepare(source, ctx.work_dir, threads=ctx.threads)
    export_s = time.perf_counter() - started
    exported = artifact != source
    if exported:
        ctx.logger.info(
            "prepared %s for %s in %.1fs (no build stage output given)", source, engine.name, export_s
        )
    if spec is not None:
        draft_src = ctx.input_path(spec.draft)
        if draft_src.resolve() == source.resolve():  # self-drafting: reuse the prepared artifact
            draft = artifact
        else:
            (ctx.work_dir / "draft").mkdir(exist_ok=True)
            draft = engine.prepare(draft_src, ctx.work_dir / "draft", threads=ctx.threads)
        settings = dataclasses.replace(settings, draft=draft)
    try:
        repo = engine.write_repository(ctx.output_dir / "repository", artifact, settings)
    except ValueError as e:
        raise OperatorError(f"serve stage {stage.name!r}: {e}") from None
    # `engine` is already a param: the stage field as written (null when inferred), which MLflow
    # will not overwrite; the engine actually used goes beside it.
    ctx.log_params({"engine_selected": engine.name, "exported_in_stage": exported, **repo.params})
    if not engine.server.runs_here:
        ctx.logger.info("wrote the %s repository (runs in %s)", engine.name, engine.server.image)
    return StageResult(outputs={"repository": repo.path}, metrics={"export_seconds": round(export_s, 3)})


def _adapters(ctx: StageContext, served: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, ref in sorted(ctx.stage.adapters.items()):
        if name == served:
            raise OperatorError(
                f"adapter name {name!r} is the served model's own name; rename the adapter under `adapters:`"
            )
        out[name] = ctx.input_path(ref)
    return out
