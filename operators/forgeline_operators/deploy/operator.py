"""``run(ctx)`` of the deploy stage, local target: a detached tritonserver + OpenAI front.

The endpoint outlives the workflow run (like ``docker run -d``) and is recorded under
``<home>/endpoints/``; rerunning replaces the endpoint of the same name. The output is the URL. A
Kubernetes target (ModelEndpoint CR → Triton Deployment / NIMService) is a later operator.
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
    if ctx.workflow.target != "local":
        raise OperatorError(f"deploy target {ctx.workflow.target!r} is not available yet; use target: local")
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


def cache_check(record: StageRecord, home: Path, tracking_uri: str) -> str | None:
    """A cached deploy is valid only while its endpoint is still up and ready."""
    url = str(record.outputs.get("endpoint", {}).get("value", ""))
    if not any(rec.url == url for rec in list_endpoints(home)):
        return f"endpoint {url} is no longer running"
    try:
        ready = httpx.get(f"{url}/v1/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError as e:
        return f"endpoint {url} does not answer: {e}"
    return None if ready else f"endpoint {url} is not ready"
