"""Fetch and cache the ``tritonserver`` binary (2.51, python backend) from the ``nvidia-pytriton`` wheel.

Only the server is taken from the wheel: pytriton itself pins ``numpy<2``, which this environment
cannot have. The wheel's ``pytriton/tritonserver/`` and ``nvidia_pytriton.libs/`` are unpacked into a
cache outside the repository, keeping their relative layout (the binary's RPATH expects the libs
folder three levels above ``bin/``), and the Python 3.11 backend stub is copied next to the python
backend. Idempotent: a complete cache is detected by a marker file and left alone.

The stub was built with a pybind11 that predates numpy 2: under numpy 2 every tensor crossing the
stub is corrupted (inputs arrive as their first byte repeated, outputs fail with "output tensor shape
does not match"). So the stub runs in a *stub environment*: a bare venv whose site-packages hold
numpy 1.26 and a ``.pth`` that appends the project venv's site-packages (openvino, tokenizers, ...).
The stub takes ``sys.prefix`` from the ``python3`` first on ``PATH``, so putting the stub
environment's ``bin`` first is all the server needs.

    python -m forgeline_operators.deploy.install      # prints the server root and stub environment
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from forgeline.artifacts import extract_zip

__all__ = [
    "STUB_NUMPY",
    "TRITON_VERSION",
    "WHEEL",
    "cache_root",
    "ensure_stub_env",
    "ensure_tritonserver",
    "installed_root",
]

TRITON_VERSION = "2.51"
WHEEL = "nvidia-pytriton==0.7.0"
STUB_NUMPY = "numpy==1.26.4"
_MARKER = ".forgeline-complete"
_PREFIXES = ("pytriton/tritonserver/", "nvidia_pytriton.libs/")


def cache_root() -> Path:
    """Where the server lives: ``$FORGELINE_TRITON_HOME`` or ``~/.cache/forgeline/tritonserver-2.51``."""
    explicit = os.environ.get("FORGELINE_TRITON_HOME")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "forgeline" / f"tritonserver-{TRITON_VERSION}"


def installed_root() -> Path | None:
    """The server root (holding ``bin/`` and ``backends/``) when the cache is complete, else None."""
    root = cache_root()
    if (root / _MARKER).exists():
        return root / "pytriton" / "tritonserver"
    return None


def _unpack(wheel: Path, dest: Path) -> None:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    # Every member through the confinement helper: a wheel is outside input too.
    extract_zip(
        wheel,
        dest,
        select=lambda info: info.filename.startswith(_PREFIXES) and not info.is_dir(),
        keep_mode=True,
    )
    server = dest / "pytriton" / "tritonserver"
    stub = server / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"{WHEEL} has no python backend stub for Python {py}")
    shutil.copy2(stub, server / "backends" / "python" / "triton_python_backend_stub")
    for exe in (
        server / "bin" / "tritonserver",
        server / "backends" / "python" / "triton_python_backend_stub",
    ):
        exe.chmod(0o755)


def ensure_tritonserver(quiet: bool = False) -> Path:
    """Return the server root, downloading and unpacking the wheel on first use."""
    found = installed_root()
    if found is not None:
        return found
    root = cache_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="forgeline-triton-", dir=root.parent) as tmp:
        tmp_path = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["-d", str(tmp_path / "wheel"), WHEEL]
        if quiet:
            cmd.append("-q")
        subprocess.run(cmd, check=True)
        (wheel,) = (tmp_path / "wheel").glob("*.whl")
        staging = tmp_path / "tree"
        _unpack(wheel, staging)
        (staging / _MARKER).write_text(f"{WHEEL}\n")
        # Publish atomically: a half-unpacked tree is never seen as installed.
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    found = installed_root()
    assert found is not None
    return found


def _pip_download(spec: str, dest: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--only-binary=:all:", "-d", str(dest), spec]
    if quiet:
        cmd.append("-q")
    subprocess.run(cmd, check=True)
    (wheel,) = dest.glob("*.whl")
    return wheel


def ensure_stub_env(quiet: bool = False) -> Path:
    """A stub environment for the current interpreter's venv; returns its ``bin`` directory."""
    site = Path(sysconfig.get_paths()["purelib"])
    key = hashlib.sha256(f"{sys.prefix}\n{STUB_NUMPY}".encode()).hexdigest()[:12]
    env = cache_root().parent / f"triton-stub-env-{key}"
    if (env / _MARKER).exists():
        return env / "bin"
    env.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="forgeline-stubenv-", dir=env.parent) as tmp:
        staging = Path(tmp) / "env"
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(staging)], check=True)
        wheel = _pip_download(STUB_NUMPY, Path(tmp) / "wheel", quiet)
        (stage_site,) = staging.glob("lib/python*/site-packages")
        extract_zip(wheel, stage_site)
        # addsitedir (not a bare path line) so the venv's own .pth files (editable installs) apply too.
        (stage_site / "zz-forgeline-venv.pth").write_text(f"import site; site.addsitedir({str(site)!r})\n")
        (staging / _MARKER).write_text(f"{sys.prefix}\n")
        shutil.rmtree(env, ignore_errors=True)
        # venv scripts embed their path: recreate at the final location rather than rename blindly.
        staging.rename(env)
    subprocess.run([base, "-m", "venv", "--without-pip", str(env)], check=True)
    return env / "bin"


if __name__ == "__main__":
    quiet = "-q" in sys.argv
    print(ensure_tritonserver(quiet=quiet))
    print(ensure_stub_env(quiet=quiet))
