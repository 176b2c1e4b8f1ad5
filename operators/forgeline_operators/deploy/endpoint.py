"""A local endpoint: one supervisor process running tritonserver plus the OpenAI front.

``python -m forgeline_operators.deploy.endpoint --repository R --name N --port P --home H`` runs in
the foreground: it starts tritonserver (a child in the supervisor's process group), serves the front
with uvicorn, records itself under ``<home>/endpoints/<name>.json`` (+ ``.pid``, ``.log``) and, on
SIGTERM/SIGINT, stops the front, then the server, then removes its record.

:func:`start_detached` launches that supervisor detached (like ``docker run -d``) through a short-lived
trampoline, so it is re-parented away from the caller (a Ray worker's children die with the worker);
a rerun with the same name replaces the running endpoint. :func:`stop_endpoint` sends SIGTERM, waits,
then SIGKILLs the whole process group: no orphans.

Records and pid files are only read, written and signalled inside the home they belong to: an endpoint
name must be one plain file name (:func:`forgeline.artifacts.single_name`), and a recorded process is
signalled only once its command line (this module, ``--name``, ``--home``) and its start time (from
``/proc``) show it is that endpoint -- never on a record's or pid file's word alone, since a pid can be
reused and a record edited.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from forgeline.artifacts import pid_alive, single_name, write_text_atomic
from forgeline_operators.deploy.triton import TritonPorts, TritonServer, group_members, kill_group
from forgeline_operators.ports import free_port

__all__ = [
    "EndpointError",
    "EndpointRecord",
    "endpoints_dir",
    "list_endpoints",
    "start_detached",
    "stop_all",
    "stop_endpoint",
]

_MANIFEST = "forgeline-repository.json"


class EndpointError(RuntimeError):
    """An endpoint did not come up, or could not be found."""


@dataclass(frozen=True)
class EndpointRecord:
    name: str
    url: str
    port: int
    pid: int
    pgid: int
    repository: str
    model: str
    triton_url: str
    log: str
    started_at: float
    ready: bool = False
    # host:port of Triton's gRPC service: load/reload models there (triton.load_model), not over HTTP.
    triton_grpc: str = ""
    # The supervisor's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid,
    # the process's identity (a pid alone can be reused).
    proc_start: str = ""

    @property
    def alive(self) -> bool:
        """Whether the recorded supervisor is running: its pid, start time and command line agree."""
        return _is_supervisor(self, None)


def endpoints_dir(home: Path) -> Path:
    return home / "endpoints"


def _record_path(home: Path, name: str) -> Path:
    single_name(name, what="endpoint name")
    return endpoints_dir(home) / f"{name}.json"


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _arg(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def _is_supervisor(rec: EndpointRecord, home: Path | None) -> bool:
    """Whether ``rec.pid`` is the supervisor the record describes (and, given ``home``, of that home)."""
    if not pid_alive(rec.pid):
        return False
    if rec.proc_start and _proc_start(rec.pid) != rec.proc_start:
        return False  # the pid was reused by a later process
    argv = _cmdline(rec.pid)
    if "forgeline_operators.deploy.endpoint" not in argv or _arg(argv, "--name") != rec.name:
        return False
    if home is not None:
        theirs = _arg(argv, "--home")
        if theirs is None:
            return False
        path = Path(theirs)
        if not path.is_absolute():
            try:
                path = Path(os.readlink(f"/proc/{rec.pid}/cwd")) / path
            except OSError:
                return False
        if path.resolve() != home.resolve():
            return False
    return True


def _group_serves(rec: EndpointRecord) -> bool:
    """Whether the record's process group still holds its tritonserver or python stubs (their command
    lines name the record's repository): only then is the group ours to kill."""
    return any(
        any(rec.repository in arg for arg in _cmdline(pid))
        for pid in group_members(rec.pgid)
        if rec.repository
    )


def _write_record(home: Path, record: EndpointRecord) -> None:
    path = _record_path(home, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(asdict(record), indent=2) + "\n")
    path.with_suffix(".pid").write_text(f"{record.pid}\n")


def _read_record(path: Path) -> EndpointRecord | None:
    try:
        return EndpointRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def list_endpoints(home: Path, prune: bool = True) -> list[EndpointRecord]:
    """Recorded endpoints; records of dead supervisors are removed when ``prune``."""
    out = []
    for path in sorted(endpoints_dir(home).glob("*.json")):
        rec = _read_record(path)
        if rec is None or rec.name != path.stem:
            continue  # unreadable, or a record that names another endpoint than its file: not ours
        if not rec.alive and prune:
            path.unlink(missing_ok=True)
            path.with_suffix(".pid").unlink(missing_ok=True)
            continue
        out.append(rec)
    return out


def stop_endpoint(home: Path, name: str, grace_s: float = 20.0) -> bool:
    """Stop the endpoint ``name`` of ``home``; False when none was recorded."""
    path = _record_path(home, name)
    rec = _read_record(path)
    if rec is None:
        return False
    if rec.name != name:
        raise EndpointError(f"{path}: records endpoint {rec.name!r}, not {name!r}; left alone")
    _stop_record(rec, grace_s, home)
    path.unlink(missing_ok=True)
    path.with_suffix(".pid").unlink(missing_ok=True)
    return True


def stop_all(home: Path) -> list[str]:
    names = [r.name for r in list_endpoints(home, prune=False)]
    for n in names:
        stop_endpoint(home, n)
    return names


def _stop_record(rec: EndpointRecord, grace_s: float, home: Path) -> None:
    if _is_supervisor(rec, home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGTERM)  # graceful: front, then tritonserver, then the record
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and pid_alive(rec.pid):
            time.sleep(0.1)
        kill_group(rec.pgid, grace_s=2.0)  # whatever the supervisor left behind (python stubs)
    elif _group_serves(rec):
        kill_group(rec.pgid, grace_s=2.0)  # a killed supervisor's tritonserver and stubs


def served_model(repository: Path) -> tuple[str, tuple[str, ...]]:
    """(Triton model name, LoRA adapter names) of a repository built by the serve stage."""
    data = _manifest(repository)
    return str(data["served_model"]), tuple(data.get("adapters", ()))


def _manifest(repository: Path) -> dict[str, Any]:
    manifest = repository / _MANIFEST
    if not manifest.exists():
        raise EndpointError(f"{repository} is not a Forgeline model repository (no {_MANIFEST})")
    data: dict[str, Any] = json.loads(manifest.read_text())
    return data


def start_detached(
    home: Path,
    repository: Path,
    name: str,
    port: int | None = None,
    *,
    served_name: str | None = None,
    max_queue: int = 256,
    api_key_env: str | None = None,
    threads: int = 1,
    ready_timeout_s: float = 180.0,
) -> EndpointRecord:
    """Start (or replace) the endpoint ``name`` detached; returns once it answers ready."""
    served_model(repository)  # fail fast on a wrong directory
    home = home.resolve()  # the supervisor's --home names it absolutely (its identity check reads it)
    stop_endpoint(home, name)
    port = port or free_port()
    folder = endpoints_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    cmd = [sys.executable, "-m", "forgeline_operators.deploy.endpoint", "--repository", str(repository)]
    cmd += ["--name", name, "--port", str(port), "--home", str(home), "--max-queue", str(max_queue)]
    cmd += ["--threads", str(threads)]
    if served_name:
        cmd += ["--served-name", served_name]
    if api_key_env:
        cmd += ["--api-key-env", api_key_env]
    trampoline = (
        "import subprocess, sys\n"
        "log = open(sys.argv[1], 'ab')\n"
        "p = subprocess.Popen(sys.argv[2:], start_new_session=True, stdin=subprocess.DEVNULL, "
        "stdout=log, stderr=subprocess.STDOUT)\n"
        "print(p.pid)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", trampoline, str(log), *cmd], capture_output=True, text=True, check=True
    )
    pid = int(out.stdout.strip())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    try:
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if not pid_alive(pid):
                    raise EndpointError(f"endpoint {name!r} exited during start-up; log {log}:\n{_tail(log)}")
                rec = _read_record(_record_path(home, name))
                if rec is not None and rec.pid == pid and rec.ready:
                    try:
                        if client.get(f"{url}/v1/health/ready").status_code == 200:
                            return rec
                    except httpx.TransportError:
                        pass
                time.sleep(0.2)
        raise EndpointError(
            f"endpoint {name!r} not ready after {ready_timeout_s:.0f}s; log {log}:\n{_tail(log)}"
        )
    except BaseException:
        kill_group(pid, grace_s=5)
        _record_path(home, name).unlink(missing_ok=True)
        raise


def _tail(log: Path, n: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------- supervisor


def serve_foreground(
    repository: Path,
    name: str,
    port: int,
    home: Path | None,
    served_name: str | None = None,
    max_queue: int = 256,
    api_key: str | None = None,
    threads: int = 1,
) -> None:
    """Run tritonserver + the front until SIGTERM/SIGINT (the supervisor's body)."""
    import uvicorn

    from forgeline_operators.deploy.front import FrontSettings, create_app

    model, adapters = served_model(repository)
    manifest = _manifest(repository)
    log = (endpoints_dir(home) / f"{name}.triton.log") if home else None
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    # Every model of the repository loads at start (with adapters: the router and one engine per
    # adapter), so the first request does not pay the engines' load and ready means ready.
    models = list(manifest.get("models") or [model])
    server = TritonServer(
        repository, models, TritonPorts.pick(avoid=[port]), log_path=log, threads=threads, own_group=False
    )
    record: EndpointRecord | None = None
    try:
        server.start()
        settings = FrontSettings(
            triton_url=server.url,
            triton_model=model,
            served_name=served_name or name,
            triton_metrics_url=server.metrics_url,
            adapters=adapters,
            routes=dict(manifest.get("routes") or {}),
            max_queue=max_queue,
            api_key=api_key,
        )
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
        front = uvicorn.Server(config)
        if home:
            record = EndpointRecord(
                name=name,
                url=f"http://127.0.0.1:{port}",
                port=port,
                pid=os.getpid(),
                pgid=os.getpgid(0),
                repository=str(repository),
                model=served_name or name,
                triton_url=server.url,
                triton_grpc=server.grpc_target,
                log=str(endpoints_dir(home) / f"{name}.log"),
                started_at=time.time(),
                proc_start=_proc_start(os.getpid()) or "",
            )

            original = front.startup

            async def startup(sockets: object = None) -> None:
                await original(sockets)  # type: ignore[arg-type]
                _write_record(home, EndpointRecord(**{**asdict(record), "ready": True}))

            front.startup = startup  # type: ignore[method-assign]
        front.run()
    finally:
        server.stop()
        if home and record is not None:
            current = _read_record(_record_path(home, name))
            if current is not None and current.pid == os.getpid():
                _record_path(home, name).unlink(missing_ok=True)
                _record_path(home, name).with_suffix(".pid").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="forgeline-endpoint", description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--served-name", default=None)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--api-key-env", default=None, help="Environment variable holding the bearer token.")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    # uvicorn turns SIGTERM into a graceful shutdown; the finally blocks then stop tritonserver.
    api_key = os.environ.get(a.api_key_env) if a.api_key_env else None
    serve_foreground(
        a.repository.resolve(), a.name, a.port, a.home, a.served_name, a.max_queue, api_key, a.threads
    )


if __name__ == "__main__":
    main()
