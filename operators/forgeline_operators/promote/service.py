"""Promotion, rollback, approval and history of registered models: what ``forgeline promote``, the
``promote`` stage and the REST API all call.

Aliases: the workflow sets ``candidate``; only promotion moves ``production`` (any ``to_alias``), and
the version it replaces is kept as ``previous`` (``<alias>-previous`` for other aliases) for
``rollback``. Order of a promotion, so that a failure leaves nothing half-done:

1. take the model's promotion lock (a second promotion of the same model gets :class:`ConflictError`);
2. run the gates (metrics vs production / parent, quantization delta, SLO benchmark against a
   candidate endpoint, manual approval); any failure → :class:`GateFailed` with the numbers, nothing
   moved;
3. point the production endpoint at the version and wait until it serves it (local target: Triton
   version swap, see :mod:`.local`); if that fails the alias does not move;
4. check the alias still names the version read in step 1 (compare-and-set), then move it;
5. record the attempt (every outcome, blocked ones too) as a run of the ``forgeline-promotions``
   experiment, and the gate results as tags on the version.

The production endpoint a model uses is remembered on the registered model
(``forgeline.endpoint.<alias>`` tag), so later promotions and rollbacks find it by model name. On the
kubernetes target, step 3 is the ``ModelEndpoint``'s own rollout (:mod:`.kube`).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from mlflow.exceptions import MlflowException
from pydantic import BaseModel, Field

from forgeline.artifacts import single_name
from forgeline.tracking import (
    RegisteredVersion,
    Tracker,
    alias_version,
    delete_alias,
    get_version,
    log_promotion,
    model_tags,
    promotion_history,
    set_alias,
    set_model_tag,
    set_version_tags,
    version_metrics,
)
from forgeline_operators.deploy.endpoint import EndpointError, list_endpoints
from forgeline_operators.promote import gates as g
from forgeline_operators.promote.local import point_endpoint, serving_state, temporary_endpoint
from forgeline_operators.promote.spec import PromoteEndpointSpec, PromotionGates

__all__ = [
    "ConflictError",
    "GateFailed",
    "PromoteEndpointSpec",
    "PromotionError",
    "PromotionGates",
    "PromotionRecord",
    "approve",
    "history",
    "previous_alias",
    "promote",
    "rollback",
]

_ENDPOINT_TAG = "forgeline.endpoint."  # + alias: the production endpoint's spec (JSON)


class PromotionError(RuntimeError):
    """A promotion or rollback that cannot happen (unknown version, no endpoint, rollout failed)."""

    def __init__(self, message: str, record: PromotionRecord | None = None) -> None:
        super().__init__(message)
        self.record = record


class GateFailed(PromotionError):
    """A gate blocked the promotion; ``record.gates`` has every result with its numbers."""


class ConflictError(PromotionError):
    """Another promotion of the same model is in progress, or the alias moved meanwhile."""


class PromotionRecord(BaseModel):
    model: str = Field(description="Registered model name.")
    version: int | None = Field(description="Version promoted (or rolled back to).")
    action: Literal["promote", "rollback"] = Field(description="What was asked.")
    from_alias: str | None = Field(default=None, description="Alias the version was taken from.")
    to_alias: str = Field(description="Alias moved.")
    previous_version: int | None = Field(default=None, description="What the alias named before.")
    actor: str = Field(description="Who asked.")
    outcome: Literal["promoted", "unchanged", "blocked", "failed", "rolled_back"] = Field(
        description="What happened."
    )
    gates: list[dict[str, Any]] = Field(default_factory=list, description="Gate results with inputs.")
    endpoint: dict[str, Any] | None = Field(default=None, description="Endpoint pointed at the version.")
    started_at: float = Field(description="Unix time the attempt started.")
    duration_s: float = Field(default=0.0, description="Seconds the attempt took.")
    message: str = Field(default="", description="Human-readable summary.")
    run_id: str | None = Field(default=None, description="MLflow run holding this record.")


def previous_alias(to_alias: str) -> str:
    return "previous" if to_alias == "production" else f"{to_alias}-previous"


def default_actor() -> str:
    return os.environ.get("FORGELINE_ACTOR") or getpass.getuser()


@contextlib.contextmanager
def _lock(home: Path, name: str, actor: str) -> Iterator[None]:
    """One promotion per model at a time on this Forgeline home (the endpoints live here too)."""
    folder = home / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"promote-{single_name(name, what='registered model name')}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ConflictError(
                f"another promotion of {name!r} is in progress ({holder}); retry when it has finished"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"actor": actor, "pid": os.getpid(), "since": time.time()}))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme else uri)
    raise PromotionError(
        f"the local production endpoint needs the version's files on this machine; it is at {uri} "
        "(use the kubernetes target for object-store versions)"
    )


def _endpoint_spec(
    tracker: Tracker, name: str, to_alias: str, endpoint: PromoteEndpointSpec | str | None
) -> PromoteEndpointSpec | None:
    if isinstance(endpoint, PromoteEndpointSpec):
        return endpoint
    remembered = model_tags(tracker, name).get(_ENDPOINT_TAG + to_alias)
    spec = PromoteEndpointSpec.model_validate_json(remembered) if remembered else None
    if isinstance(endpoint, str):
        if spec is not None and spec.name == endpoint:
            return spec
        return PromoteEndpointSpec(name=endpoint)
    return spec


def _version(tracker: Tracker, name: str, version: int | None, from_alias: str) -> RegisteredVersion:
    try:
        if version is not None:
            return get_version(tracker, name, version)
        found = alias_version(tracker, name, from_alias)
    except MlflowException as e:
        raise PromotionError(f"model {name!r} version {version or '@' + from_alias}: {e.message}") from None
    if found is None:
        raise PromotionError(f"model {name!r} has no alias {from_alias!r}; give --version N")
    return get_version(tracker, name, found)


def _serves(home: Path, spec: PromoteEndpointSpec, version: int, name: str) -> bool:
    if spec.target == "kubernetes":
        return False  # the rollout call itself is idempotent (it returns at once when already serving)
    state = serving_state(home, spec.name)
    running = any(r.name == spec.name for r in list_endpoints(home))
    return bool(
        running and state and state.get("version") == version and state.get("registered_model") == name
    )


def _point(
    home: Path, spec: PromoteEndpointSpec, name: str, version: RegisteredVersion, threads: int
) -> dict[str, Any]:
    """Make the endpoint serve ``version`` (and wait until it does); what to record about it."""
    if spec.target == "kubernetes":
        from forgeline_operators.lib.kube_client import NoCluster, connect
        from forgeline_operators.promote.kube import point_model_endpoint

        try:
            kube = connect()
        except NoCluster as e:
            raise PromotionError(str(e)) from None
        status = point_model_endpoint(
            kube,
            spec.name,
            spec.namespace,
            uri=version.uri,
            sha256=version.tags.get("forgeline.sha256"),
            version_label=f"{name}/{version.version}",
            timeout_s=spec.timeout_s,
        )
        return {**spec.model_dump(), "url": status.get("url"), "revision": status.get("currentRevision")}
    rec, started = point_endpoint(
        home,
        spec.name,
        _local_path(version.uri),
        version.version,
        registered_model=name,
        port=spec.port,
        scheduler=spec.scheduler,
        threads=threads,
        timeout_s=spec.timeout_s,
    )
    return {**spec.model_dump(), "url": rec.url, "started": started}


def _gate_tag(result: g.GateResult) -> str:
    """A gate's result with its inputs, as a version tag (inputs dropped if too long for one)."""
    text = json.dumps(result.to_json(), default=str)
    if len(text) > 5000:
        text = json.dumps({"passed": result.passed, "message": result.message[:4000]})
    return text


def _switch(
    home: Path,
    tracker: Tracker,
    record: PromotionRecord,
    spec: PromoteEndpointSpec,
    version: RegisteredVersion,
    threads: int,
    t0: float,
) -> None:
    """Point the endpoint at ``version``; on failure record it (the alias stays) and raise."""
    try:
        record.endpoint = _point(home, spec, record.model, version, threads)
    except (EndpointError, PromotionError) as e:
        record.outcome = "failed"
        record.message = f"{record.to_alias} stays at version {record.previous_version}: {e}"
        _finish(tracker, record, t0, home)
        raise PromotionError(record.message, record) from None


def _finish(tracker: Tracker, record: PromotionRecord, started: float, home: Path) -> PromotionRecord:
    record.duration_s = round(time.monotonic() - started, 3)
    metrics: dict[str, float] = {"duration_s": record.duration_s}
    for gate in record.gates:
        for key, value in gate.get("inputs", {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"{gate['name']}.{key}".replace(":", ".")] = float(value)
    root = home / "artifacts" / "mlflow"
    record.run_id = log_promotion(tracker, record.model_dump(exclude={"run_id"}), metrics, root)
    return record


def _run_gates(
    home: Path,
    tracker: Tracker,
    name: str,
    candidate: RegisteredVersion,
    production: RegisteredVersion | None,
    gates: PromotionGates,
    candidate_endpoint: str | None,
    threads: int,
) -> list[g.GateResult]:
    results: list[g.GateResult] = []
    cand_metrics = version_metrics(candidate)
    prod_metrics = version_metrics(production) if production else None
    cand_rows = g.version_rows(candidate.tags)
    prod_rows = g.version_rows(production.tags) if production else {}
    for gate in gates.metrics:
        results.append(
            g.metric_gate(
                gate,
                cand_metrics,
                prod_metrics,
                production.version if production else None,
                cand_rows,
                prod_rows,
            )
        )
    if gates.quantization is not None:
        results.append(g.quantization_gate(gates.quantization, cand_metrics))
    if gates.approval:
        results.append(g.approval_gate(candidate.tags))
    if gates.slo is not None:
        results.append(_slo(home, name, candidate, gates, candidate_endpoint, threads))
    return results


def _slo(
    home: Path,
    name: str,
    candidate: RegisteredVersion,
    gates: PromotionGates,
    url: str | None,
    threads: int,
) -> g.GateResult:
    from forgeline_operators.deploy.loadgen import LoadSpec, run_load

    slo = gates.slo
    assert slo is not None
    spec = LoadSpec(
        requests=slo.requests,
        concurrency=slo.concurrency,
        output_tokens=(slo.max_tokens, slo.max_tokens),
        prompt_words=(8, 48),
        timeout_s=120.0,
    )
    if url:
        return g.slo_gate(slo, run_load(url, spec).to_json(), url)
    endpoint = f"{name}-candidate-v{candidate.version}".lower().replace("_", "-")[:60]
    try:
        with temporary_endpoint(home, endpoint, _local_path(candidate.uri), threads=threads) as rec:
            return g.slo_gate(slo, run_load(rec.url, spec).to_json(), rec.url)
    except EndpointError as e:
        return g.GateResult("slo", False, f"the candidate endpoint did not start: {e}")


def promote(
    home: Path,
    tracking_uri: str,
    name: str,
    *,
    version: int | None = None,
    from_alias: str = "candidate",
    to_alias: str = "production",
    gates: PromotionGates | None = None,
    endpoint: PromoteEndpointSpec | str | None = None,
    candidate_endpoint: str | None = None,
    actor: str | None = None,
    threads: int = 1,
) -> PromotionRecord:
    """Gate, roll out and move ``to_alias`` to a version (see the module docstring for the order)."""
    actor = actor or default_actor()
    gates = gates or PromotionGates()
    tracker = Tracker(tracking_uri)
    started, t0 = time.time(), time.monotonic()
    with _lock(home, name, actor):
        candidate = _version(tracker, name, version, from_alias)
        current = alias_version(tracker, name, to_alias)
        production = get_version(tracker, name, current) if current is not None else None
        spec = _endpoint_spec(tracker, name, to_alias, endpoint)
        record = PromotionRecord(
            model=name,
            version=candidate.version,
            action="promote",
            from_alias=None if version is not None else from_alias,
            to_alias=to_alias,
            previous_version=current,
            actor=actor,
            outcome="promoted",
            endpoint=spec.model_dump() if spec else None,
            started_at=started,
        )
        if current == candidate.version and (spec is None or _serves(home, spec, candidate.version, name)):
            record.outcome = "unchanged"
            record.message = f"{name} version {candidate.version} is already {to_alias}"
            return _finish(tracker, record, t0, home)
        results = _run_gates(home, tracker, name, candidate, production, gates, candidate_endpoint, threads)
        record.gates = [r.to_json() for r in results]
        set_version_tags(
            tracker,
            name,
            candidate.version,
            {f"forgeline.gate.{r.name}": _gate_tag(r) for r in results},
        )
        failed = [r for r in results if not r.passed]
        if failed:
            record.outcome = "blocked"
            record.message = (
                f"promotion of {name} version {candidate.version} to {to_alias} blocked: "
                + "; ".join(f"[{r.name}] {r.message}" for r in failed)
            )
            _finish(tracker, record, t0, home)
            raise GateFailed(record.message, record)
        if spec is not None:
            _switch(home, tracker, record, spec, candidate, threads, t0)
            set_model_tag(tracker, name, _ENDPOINT_TAG + to_alias, spec.model_dump_json())
        if alias_version(tracker, name, to_alias) != current:
            record.outcome = "failed"
            record.message = f"{to_alias} of {name} moved during the promotion; nothing changed by this one"
            _finish(tracker, record, t0, home)
            raise ConflictError(record.message, record)
        set_alias(tracker, name, to_alias, candidate.version)
        if current is not None and current != candidate.version:
            set_alias(tracker, name, previous_alias(to_alias), current)
        set_version_tags(
            tracker,
            name,
            candidate.version,
            {"forgeline.promoted_by": actor, "forgeline.promoted_at": str(started)},
        )
        record.message = f"{name} version {candidate.version} is {to_alias}" + (
            f" (was {current})" if current is not None else ""
        )
        return _finish(tracker, record, t0, home)


def rollback(
    home: Path,
    tracking_uri: str,
    name: str,
    *,
    to_alias: str = "production",
    endpoint: PromoteEndpointSpec | str | None = None,
    actor: str | None = None,
    threads: int = 1,
) -> PromotionRecord:
    """Return ``to_alias`` (and its endpoint) to the version it named before the last promotion."""
    actor = actor or default_actor()
    tracker = Tracker(tracking_uri)
    started, t0 = time.time(), time.monotonic()
    with _lock(home, name, actor):
        try:
            current = alias_version(tracker, name, to_alias)
            target = alias_version(tracker, name, previous_alias(to_alias))
        except MlflowException as e:
            raise PromotionError(f"model {name!r}: {e.message}") from None
        if current is None:
            raise PromotionError(f"{name} has no {to_alias!r} version to roll back")
        if target is None:
            raise PromotionError(f"{name} has no {previous_alias(to_alias)!r} version to roll back to")
        version = get_version(tracker, name, target)
        spec = _endpoint_spec(tracker, name, to_alias, endpoint)
        record = PromotionRecord(
            model=name,
            version=target,
            action="rollback",
            to_alias=to_alias,
            previous_version=current,
            actor=actor,
            outcome="rolled_back",
            endpoint=spec.model_dump() if spec else None,
            started_at=started,
        )
        if spec is not None:
            _switch(home, tracker, record, spec, version, threads, t0)
        set_alias(tracker, name, to_alias, target)
        before = _version_before(tracker, name, target, to_alias)
        if before is not None and before != target:
            set_alias(tracker, name, previous_alias(to_alias), before)
        else:
            delete_alias(tracker, name, previous_alias(to_alias))
        record.message = f"{name} {to_alias} rolled back from version {current} to {target}"
        return _finish(tracker, record, t0, home)


def _version_before(tracker: Tracker, name: str, version: int, to_alias: str) -> int | None:
    """What ``to_alias`` named before ``version`` last became it (from the promotion history)."""
    for rec in promotion_history(tracker, name):
        if (
            rec.get("to_alias") == to_alias
            and str(rec.get("version")) == str(version)
            and rec.get("outcome") in ("promoted", "rolled_back")
        ):
            prev = rec.get("previous_version")
            if rec.get("action") == "rollback":
                continue  # a rollback *to* version: keep looking for how it first got there
            return int(prev) if prev not in (None, "") else None
    return None


def history(tracking_uri: str, name: str) -> list[PromotionRecord]:
    """Every promotion / rollback attempt of ``name``, newest first."""
    out = []
    for rec in promotion_history(Tracker(tracking_uri), name):
        with contextlib.suppress(ValueError):
            out.append(PromotionRecord.model_validate(rec))
    return out


def approve(tracking_uri: str, name: str, version: int, actor: str | None = None, note: str = "") -> None:
    """Record a manual approval on a version (the ``approval`` gate reads it)."""
    tracker = Tracker(tracking_uri)
    try:
        get_version(tracker, name, version)
    except MlflowException as e:
        raise PromotionError(f"model {name!r} version {version}: {e.message}") from None
    tags = {g.APPROVAL_TAG: actor or default_actor(), "forgeline.approved_at": str(time.time())}
    if note:
        tags["forgeline.approval_note"] = note
    set_version_tags(tracker, name, version, tags)
