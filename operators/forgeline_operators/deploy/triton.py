"""A managed ``tritonserver`` process: start, wait ready, load/unload/reload models, stop, no orphans.

The server runs in its own process group (its python stubs are its children), with explicit model
control so models move through the repository API (promotion without restart). Every wait polls
with a deadline; :meth:`TritonServer.stop` sends SIGTERM to the group, waits, then SIGKILLs it.

Load and unload go through **gRPC**, never HTTP. In tritonserver 2.51 an HTTP repository call runs
synchronously on one of the HTTP frontend's event threads for the whole load (seconds); responses of
``generate_stream`` requests in flight are handed to those threads with ``evthr_defer``, and while the
load blocks, events get lost: the stream then ends early on a stale event with no finish reason, or
never ends. Measured with a 3000-token stream and a mid-stream load (of the same model or another
one): over HTTP 786-955 of ~1200 events arrived, ending at ~2000 tokens; over gRPC every stream was
whole. The old instance itself keeps generating to the end either way: Triton swaps in the new
instance for new requests and keeps the old one alive until its response senders are gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sysconfig
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from forgeline_operators.deploy.install import ensure_stub_env, ensure_tritonserver
from forgeline_operators.ports import free_ports

__all__ = [
    "TritonError",
    "TritonPorts",
    "TritonServer",
    "group_members",
    "kill_group",
    "load_model",
    "repository_request",
    "server_env",
    "unload_model",
]


class TritonError(RuntimeError):
    """The server did not start, a model did not load, or the server answered with an error."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def repository_request(model: str) -> bytes:
    """Serialized ``inference.RepositoryModelLoadRequest`` / ``...UnloadRequest`` for ``model``.

    Both messages carry ``model_name`` as field 2 (``grpc_service.proto``, Triton r24.10); written by
    hand so that loading a model needs grpcio only, not tritonclient and its generated stubs.
    """
    name = model.encode()
    return b"\x12" + _varint(len(name)) + name


def _grpc_repository(target: str, method: str, model: str, timeout_s: float) -> None:
    import grpc

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        try:
            call(repository_request(model), timeout=timeout_s)
        except grpc.RpcError as e:
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            raise TritonError(f"{method} {model!r} failed: {details}") from e


def load_model(grpc_target: str, model: str, timeout_s: float = 120.0) -> None:
    """Load, or reload, ``model`` over gRPC (see the module note: never over HTTP with streams live).

    A reload swaps the new instance in for new requests; requests in flight finish on the old one.
    """
    _grpc_repository(grpc_target, "RepositoryModelLoad", model, timeout_s)


def unload_model(grpc_target: str, model: str, timeout_s: float = 60.0) -> None:
    _grpc_repository(grpc_target, "RepositoryModelUnload", model, timeout_s)


@dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def pick(cls, avoid: Iterable[int] = ()) -> TritonPorts:
        """Three distinct free ports, none in ``avoid`` (e.g. the front's own port)."""
        http, grpc, metrics = free_ports(3, avoid)
        return cls(http, grpc, metrics)


def server_env(threads: int = 1) -> dict[str, str]:
    """Environment for the server: interpreter's libpython first, the stub environment first on PATH."""
    root = ensure_tritonserver(quiet=True)
    libs = root.parent.parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [libdir, str(libs), os.environ.get("LD_LIBRARY_PATH")])
    )
    env["PATH"] = os.pathsep.join([str(ensure_stub_env(quiet=True)), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("PYTHONPATH", None)
    return env


def _live_state(pid: int) -> tuple[int, bool] | None:
    """(process group, is zombie) of ``pid`` from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]), fields[0] == "Z"


def group_members(pgid: int) -> list[int]:
    """Running (non-zombie) processes of a process group."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _live_state(int(entry.name))
            if state is not None and state[0] == pgid and not state[1]:
                out.append(int(entry.name))
    return out


def kill_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM a process group, wait up to ``grace_s``, then SIGKILL it and wait until it is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not group_members(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and group_members(pgid):
            time.sleep(0.05)


@dataclass
class TritonServer:
    """One ``tritonserver`` over a model repository. Use as a context manager or call stop()."""

    repository: Path
    models: Iterable[str] = ()
    ports: TritonPorts = field(default_factory=TritonPorts.pick)
    log_path: Path | None = None
    threads: int = 1
    exit_timeout_s: int = 5
    # Own process group (a standalone server) or the caller's (an endpoint supervisor whose group is
    # killed as a whole, so nothing survives a SIGKILL of the supervisor).
    own_group: bool = True
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def command(self) -> list[str]:
        root = ensure_tritonserver(quiet=True)
        cmd = [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={root / 'backends'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.ports.http}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.ports.grpc}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.ports.metrics}",
            "--model-control-mode=explicit",
            "--exit-on-error=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
        ]
        cmd += [f"--load-model={m}" for m in self.models]
        return cmd

    def start(self, ready_timeout_s: float = 120.0) -> TritonServer:
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.command(),
                env=server_env(self.threads),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=self.own_group,  # stop() then reaches the python stubs too
            )
        finally:
            if self.log_path:
                log.close()  # type: ignore[union-attr]
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        models = list(self.models)
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise TritonError(f"tritonserver exited with code {self.proc.returncode}{self._tail()}")
                try:
                    if client.get(f"{self.url}/v2/health/ready").status_code == 200 and all(
                        client.get(f"{self.url}/v2/models/{m}/ready").status_code == 200 for m in models
                    ):
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise TritonError(f"tritonserver not ready after {timeout_s:.0f}s{self._tail()}")

    def _tail(self) -> str:
        if self.log_path and self.log_path.exists():
            lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
            return "; log tail:\n" + "\n".join(lines)
        return ""

    # --------------------------------------------------------------------------- repository API

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def load(self, model: str, timeout_s: float = 120.0) -> None:
        """Load (or reload: in-flight requests finish on the old instance) a model, over gRPC."""
        load_model(self.grpc_target, model, timeout_s)

    def unload(self, model: str, timeout_s: float = 60.0) -> None:
        unload_model(self.grpc_target, model, timeout_s)

    def index(self) -> list[dict[str, str]]:
        r = httpx.post(f"{self.url}/v2/repository/index", timeout=10)
        r.raise_for_status()
        result: list[dict[str, str]] = r.json()
        return result

    def ready(self, model: str | None = None) -> bool:
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        try:
            return httpx.get(self.url + path, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    # -------------------------------------------------------------------------------------- stop

    def stop(self, grace_s: float | None = None) -> None:
        if self.proc is None:
            return
        grace = grace_s if grace_s is not None else self.exit_timeout_s + 5
        if self.own_group:
            kill_group(self.proc.pid, grace)
        else:
            self.proc.terminate()  # tritonserver stops its python stubs itself
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> TritonServer:
        return self if self.proc else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
