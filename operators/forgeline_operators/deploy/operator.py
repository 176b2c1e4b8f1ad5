"""``run(ctx)`` of the deploy stage. Local target: a detached tritonserver + OpenAI front; the endpoint
outlives the workflow run (like ``docker run -d``) and is recorded under ``<home>/endpoints/``; rerunning
replaces the endpoint of the same name. Kubernetes target: a ``ModelEndpoint`` applied to the cluster of
the current kubeconfig and watched until its controller reports it Ready
(:mod:`forgeline_operators.deploy.kube_target`). The output is the endpoint's URL.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from forgeline.artifacts import StageRecord
from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline.tracking import default_home
from forgeline_operators.deploy.endpoint import EndpointError, list_endpoints, start_detached

__all__ = ["run"]


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    if ctx.workflow.target == "kubernetes":
        return _run_kubernetes(ctx)
    if ctx.workflow.target != "local":
        raise OperatorError(f"deploy target {ctx.workflow.target!r} is unknown; use local or kubernetes")
    if stage.runtime != "triton":
        raise OperatorError(
            "runtime 'nim' deploys to Kubernetes only (NIMService); use runtime: triton locally"
        )
    repository = ctx.input_path(stage.repository)
    home = ctx.home or default_home()
    name = stage.endpoint_name or ctx.workflow.name
    try:
        rec = start_detached(home, repository, name, stage.port, served_name=name, threads=ctx.threads)
    except EndpointError as e:
        raise OperatorError(str(e)) from None
    # A smoke request, so a deploy that "succeeds" can actually answer.
    r = httpx.post(
        f"{rec.url}/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 4}, timeout=60
    )
    if r.status_code != 200:
        raise OperatorError(
            f"endpoint {name} is up but a test completion failed: {r.status_code} {r.text[:300]}"
        )
    ctx.set_tags({"forgeline.endpoint.url": rec.url, "forgeline.endpoint.name": name})
    ctx.logger.info(
        "endpoint %s at %s — try: curl %s/v1/completions -H 'Content-Type: application/json' "
        '-d \'{"model": "%s", "prompt": "Hello", "max_tokens": 16}\'',
        name,
        rec.url,
        rec.url,
        name,
    )
    return StageResult(outputs={"endpoint": rec.url}, metrics={"port": float(rec.port)})


def _run_kubernetes(ctx: StageContext) -> StageResult:
    from forgeline_operators.deploy.kube_target import deploy, endpoint_spec
    from forgeline_operators.lib.kube_client import NoCluster, connect

    stage = ctx.stage
    name = stage.endpoint_name or ctx.workflow.name
    try:
        # Never materialized here: pods read the repository from `kubernetes.repository` or the URI itself.
        spec = endpoint_spec(stage, str(stage.repository))
        kube = connect()
        status = deploy(kube, name, spec, log=ctx.logger.info)
    except (NoCluster, ValueError) as e:
        raise OperatorError(str(e)) from None
    url = str(status.get("url") or "")
    ctx.set_tags({"forgeline.endpoint.url": url, "forgeline.endpoint.name": name,
                  "forgeline.endpoint.revision": str(status.get("currentRevision"))})  # fmt: skip
    return StageResult(outputs={"endpoint": url})


def cache_check(record: StageRecord, home: Path, tracking_uri: str) -> str | None:
    """A cached deploy is valid only while its endpoint is still up and ready."""
    url = str(record.outputs.get("endpoint", {}).get("value", ""))
    if ".svc.cluster.local" in url:
        # Re-applying a ModelEndpoint is idempotent (an unchanged spec is the same revision, Ready at once)
        # and is the only way to learn the cluster still serves it: never reuse the record.
        return f"kubernetes endpoint {url} is re-applied on every run"
    if not any(rec.url == url for rec in list_endpoints(home)):
        return f"endpoint {url} is no longer running"
    try:
        ready = httpx.get(f"{url}/v1/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError as e:
        return f"endpoint {url} does not answer: {e}"
    return None if ready else f"endpoint {url} is not ready"
