"""The production endpoint on the local target: one tritonserver whose model moves between registered
versions without a restart.

A production endpoint serves a *live* model repository it owns, ``<home>/endpoints/live/<name>/``
(never a stage-store directory: those are immutable and sha256-manifested). Registry version ``N`` of
the model becomes Triton model version ``N`` (``<model>/<N>/`` with the model code and the engine's
artifact); ``config.pbtxt`` pins ``version_policy: specific [N]``. Pointing the endpoint at another version
writes that version directory, swaps the config atomically and asks the running tritonserver to load
the model over gRPC: Triton loads the new version beside the old one, routes new requests to it once it
is ready, and lets requests in flight finish on the old one before unloading it -- so a promotion or a
rollback drops no request (the integration test runs a load generator through it). When the endpoint
is not running, it starts (detached, like the deploy stage's endpoints) on the live repository.

A registered version may be any artifact an engine that runs here accepts (the build stage's output)
or an HF checkpoint, which the engine prepares once (for the CPU engine: an fp32 export), cached under
the live directory. Repositories are written by the engine (:mod:`forgeline_operators.engines`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from forgeline.artifacts import single_name
from forgeline_operators.deploy.endpoint import (
    EndpointError,
    EndpointRecord,
    endpoints_dir,
    list_endpoints,
    start_detached,
    stop_endpoint,
)
from forgeline_operators.deploy.triton import TritonError, load_model
from forgeline_operators.engines import MANIFEST, Engine, SchedulerSpec, ServingSettings, default_engines

__all__ = [
    "LiveState",
    "live_dir",
    "point_endpoint",
    "serving_state",
    "temporary_endpoint",
    "triton_model_name",
]

_STATE = "state.json"
_SOURCE_MARKER = "forgeline-source.txt"  # in a version directory: the source it was made from
_KEEP_VERSIONS = 3  # version directories kept on disk (current + recent ones, for a fast rollback)


def live_dir(home: Path, name: str) -> Path:
    return endpoints_dir(home) / "live" / single_name(name, what="endpoint name")


def triton_model_name(endpoint: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", endpoint)


LiveState = dict[str, Any]  # {"version", "registered_model", "source", "updated_at"}


def serving_state(home: Path, name: str) -> LiveState | None:
    """What the live repository of ``name`` was last pointed at (None if never)."""
    path = live_dir(home, name) / _STATE
    try:
        data: LiveState = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data


def _running(home: Path, name: str, repo: Path) -> EndpointRecord | None:
    for rec in list_endpoints(home):
        if rec.name == name:
            if Path(rec.repository).resolve() != repo.resolve():
                raise EndpointError(
                    f"endpoint {name!r} is running but serves {rec.repository}, not a production "
                    f"repository; stop it (forgeline endpoints stop {name}) or pick another endpoint name"
                )
            return rec
    return None


def _local_engine(source: Path) -> Engine:
    """The engine serving ``source`` in the local tritonserver (refuses one whose files run elsewhere)."""
    engine = default_engines().select(source, "cpu")
    if not engine.server.runs_here:
        raise EndpointError(
            f"{source} is served by {engine.name}, which runs in {engine.server.image}, not in the local "
            "tritonserver; promote it with target: kubernetes"
        )
    return engine


def _artifact_for(engine: Engine, source: Path, cache: Path, threads: int) -> Path:
    """The engine's artifact of a version: the source itself, or what the engine prepared from it
    (cached by source path)."""
    if cache.exists():
        return cache
    with tempfile.TemporaryDirectory(prefix="forgeline-export-") as work:
        artifact = engine.prepare(source, Path(work), threads=threads)
        if artifact == source:
            return artifact
        tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(artifact, tmp)
        os.replace(tmp, cache)
    return cache


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stage_version(
    live: Path, model: str, version: int, source: Path, scheduler: SchedulerSpec, threads: int
) -> str:
    """Write ``<model>/<version>/`` (unless it already holds ``source``); return the config.pbtxt
    pinned to that version.

    Triton names versions by number only, and a number can come back with other weights (another
    registered model promoted to the same endpoint, a registry started afresh): so the version
    directory and the engine cache record the source they were made from, and a mismatch rebuilds.
    """
    repo = live / "repository"
    target = repo / model / str(version)
    origin = str(source.resolve())
    key = hashlib.sha256(origin.encode()).hexdigest()[:16]
    with tempfile.TemporaryDirectory(prefix="forgeline-live-", dir=live) as tmp:
        engine = _local_engine(source)
        artifact = _artifact_for(engine, source, live / "engines" / key, threads)
        settings = ServingSettings(name=model, scheduler=scheduler, threads=threads)
        built = engine.write_repository(Path(tmp) / "repo", artifact, settings).path
        config = (built / model / "config.pbtxt").read_text()
        marker = target / _SOURCE_MARKER
        if target.exists() and (not marker.is_file() or marker.read_text() != origin):
            shutil.rmtree(target)  # the same number made from other weights: replace it
        if not target.exists():
            (built / model / "1" / _SOURCE_MARKER).write_text(origin)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(built / model / "1", target)
        if not (repo / MANIFEST).exists():
            shutil.copyfile(built / MANIFEST, repo / MANIFEST)
    config = re.sub(r"(?m)^version_policy:.*\n", "", config)
    return config + f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}\n"


def _prune_versions(repo: Path, model: str, keep: set[int]) -> None:
    versions = sorted(
        (int(p.name) for p in (repo / model).iterdir() if p.is_dir() and p.name.isdigit()), reverse=True
    )
    recent = set(versions[:_KEEP_VERSIONS]) | keep
    for v in versions:
        if v not in recent:
            shutil.rmtree(repo / model / str(v), ignore_errors=True)


def _serving_version(rec: EndpointRecord, model: str) -> int | None:
    """The Triton version of ``model`` that is READY (the highest one if two are, mid-swap)."""
    r = httpx.post(f"{rec.triton_url}/v2/repository/index", json={"ready": True}, timeout=10)
    r.raise_for_status()
    ready = [int(m["version"]) for m in r.json() if m.get("name") == model and m.get("state") == "READY"]
    return max(ready) if ready else None


def point_endpoint(
    home: Path,
    name: str,
    source: Path,
    version: int,
    *,
    registered_model: str,
    port: int | None = None,
    scheduler: SchedulerSpec | None = None,
    threads: int = 1,
    timeout_s: float = 300.0,
) -> tuple[EndpointRecord, bool]:
    """Serve ``source`` (registry ``version``) on the production endpoint ``name``.

    Returns (endpoint record, started): started is True when the endpoint was not running and was
    started, False when the running one was switched in place. Returns only once the endpoint serves
    the version; raises :class:`EndpointError` otherwise (the previous version keeps serving).
    """
    live = live_dir(home, name)
    live.mkdir(parents=True, exist_ok=True)
    repo = live / "repository"
    model = triton_model_name(name)
    rec = _running(home, name, repo)
    config = _stage_version(live, model, version, source, scheduler or SchedulerSpec(), threads)
    config_path = repo / model / "config.pbtxt"
    previous = config_path.read_text() if config_path.exists() else None
    _write_atomic(config_path, config)
    started = rec is None
    try:
        if rec is None:
            rec = start_detached(home, repo, name, port, served_name=name, threads=threads)
        else:
            load_model(rec.triton_grpc, model, timeout_s=timeout_s)
        deadline = time.monotonic() + 30
        while _serving_version(rec, model) != version:
            if time.monotonic() > deadline:
                raise EndpointError(f"endpoint {name!r} did not report version {version} ready")
            time.sleep(0.2)
    except (EndpointError, TritonError, httpx.HTTPError) as e:
        if previous is not None:  # the old version is still what Triton serves; keep the files saying so
            _write_atomic(config_path, previous)
        raise EndpointError(f"could not point endpoint {name!r} at version {version}: {e}") from e
    state = {
        "version": version,
        "registered_model": registered_model,
        "source": str(source),
        "updated_at": time.time(),
    }
    _write_atomic(live / _STATE, json.dumps(state, indent=2) + "\n")
    _prune_versions(repo, model, keep={version})
    return rec, started


@contextlib.contextmanager
def temporary_endpoint(
    home: Path, name: str, source: Path, *, scheduler: SchedulerSpec | None = None, threads: int = 1
) -> Iterator[EndpointRecord]:
    """A throw-away endpoint serving ``source`` (the candidate of an SLO gate); stopped on exit."""
    engine = _local_engine(source)
    settings = ServingSettings(
        name=triton_model_name(name), scheduler=scheduler or SchedulerSpec(), threads=threads
    )
    with tempfile.TemporaryDirectory(prefix="forgeline-candidate-") as work:
        artifact = engine.prepare(source, Path(work), threads=threads)
        repo = engine.write_repository(Path(work) / "repository", artifact, settings).path
        rec = start_detached(home, repo, name, None, served_name=name, threads=threads)
        try:
            yield rec
        finally:
            stop_endpoint(home, name)
