"""The build stage on ``target: kubernetes`` (engine ``tensorrt-llm``): instead of building on the
worker, apply an ``EngineBuild`` (:func:`.k8s.engine_build`) for the checkpoint and wait, with the
stage's deadline, until the build controller reports it Succeeded (engine path + sha256, or a cache
hit) or Failed (its reason and message become the stage error). The engine directory the Job
published on the shared artifact volume is then copied into the stage's artifact next to the rendered
build spec.

The checkpoint must already be on that volume: ``$FORGELINE_ARTIFACTS_DIR`` (default ``/artifacts``)
is where the artifact PVC is mounted, in the workflow's pods and in the build Job alike. The namespace
is ``$FORGELINE_K8S_NAMESPACE`` (default ``default``). Without a configured cluster the stage fails
saying how to configure one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline_operators.build.k8s import API_VERSION, KIND, engine_build
from forgeline_operators.lib.kube_client import Kube, NoCluster, connect, wait_for

__all__ = ["ARTIFACTS_ENV", "NAMESPACE_ENV", "build_on_kubernetes"]

ARTIFACTS_ENV = "FORGELINE_ARTIFACTS_DIR"
NAMESPACE_ENV = "FORGELINE_K8S_NAMESPACE"
DEFAULT_TIMEOUT_S = 4 * 3600.0


def _settled(kube: Kube, name: str, namespace: str, key: str, generation: int) -> dict[str, Any] | None:
    obj = kube.get(API_VERSION, KIND, name, namespace)
    status = (obj or {}).get("status") or {}
    fresh = status.get("cacheKey") == key and int(status.get("observedGeneration") or 0) >= generation
    return status if fresh and status.get("phase") in ("Succeeded", "Failed") else None


def build_on_kubernetes(
    ctx: StageContext, summary: dict[str, Any], src: Path, out: Path, kube: Kube | None = None
) -> StageResult:
    """Apply the ``EngineBuild`` for ``src`` and wait for its status (``summary``: :func:`.write_spec`)."""
    from forgeline_operators.build.operator import checkpoint_digest

    stage = ctx.stage
    root = Path(os.environ.get(ARTIFACTS_ENV, "/artifacts")).resolve()
    if not src.resolve().is_relative_to(root):
        raise OperatorError(
            f"target: kubernetes builds on a GPU node, which sees only the shared artifact volume "
            f"({ARTIFACTS_ENV}={root}); the checkpoint {src} is not on it: run the workflow on the cluster "
            f"(forgeline run --on kubernetes) or set {ARTIFACTS_ENV} to where the artifact PVC is mounted"
        )
    if kube is None:
        try:
            kube = connect()
        except NoCluster as e:
            raise OperatorError(f"build stage {stage.name!r}: {e}") from e
    if not kube.has_api(API_VERSION, KIND):
        raise OperatorError(
            f"the cluster does not serve {KIND} ({API_VERSION}): install Forgeline's CRDs and operator "
            "(kubectl apply -k k8s/overlays/<env>) before running with target: kubernetes"
        )
    workflow = getattr(ctx.workflow, "name", None) or "workflow"
    namespace = os.environ.get(NAMESPACE_ENV, "default")
    key = summary["engine_cache"]["key"]
    resource = engine_build(
        f"{workflow}-{stage.name}",
        namespace=namespace,
        checkpoint=str(src.resolve()),
        checkpoint_sha256=checkpoint_digest(src),
        settings=summary["settings"],
        cache_key=key,
        output=str(root / "engines" / workflow / key[:16]),
        workflow=workflow,
    )
    stored = kube.apply(resource)
    name = stored["metadata"]["name"]
    generation = int(stored["metadata"].get("generation") or 1)
    timeout_s = stage.timeout_minutes * 60 if stage.timeout_minutes else DEFAULT_TIMEOUT_S
    print(f"applied {KIND} {namespace}/{name} (cache key {key[:12]}); waiting up to {timeout_s:g} s")
    try:
        status = wait_for(
            lambda: _settled(kube, name, namespace, key, generation),
            timeout_s,
            f"{KIND} {namespace}/{name} to finish (kubectl describe enginebuild -n {namespace} {name})",
            interval_s=2.0,
        )
    except TimeoutError as e:
        raise OperatorError(str(e)) from e
    if status["phase"] == "Failed":
        raise OperatorError(
            f"{KIND} {namespace}/{name} failed ({status.get('reason')}): {status.get('message')}"
        )
    engine = Path(status["path"]) / "engine" if status.get("cache") != "hit" else Path(status["path"])
    if engine.is_dir():
        shutil.copytree(engine, out / "engine", dirs_exist_ok=True)
    engines = status.get("engines") or []
    ctx.set_tags(
        {
            "forgeline.build.engine": "tensorrt-llm",
            "forgeline.build.form": str(status.get("form") or "engine"),
            "forgeline.build.engine_cache": str(status.get("cache") or "none"),
            "forgeline.build.engine_build": f"{namespace}/{name}",
            "forgeline.build.engine_sha256": str(status.get("sha256") or ""),
        }
    )
    metrics = {
        "engines": float(len(engines)),
        "engine_cache_hit": 1.0 if status.get("cache") == "hit" else 0.0,
    }
    return StageResult(outputs={"artifact": out}, metrics=metrics)
