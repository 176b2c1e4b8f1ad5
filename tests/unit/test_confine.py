"""Confinement of every file written by a name from outside (issue 24): the helper itself, archives,
manifests, hf:// from a local hub cache, endpoint records, and the check that a recorded process is
the endpoint before it is signalled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from forgeline.artifacts import (
    ModelStore,
    PathEscapeError,
    UriError,
    check_tree,
    confined,
    extract_zip,
    new_staging_dir,
    publish,
    safe_relpath,
    single_name,
    verify,
)
from forgeline.registry import default_registry

BAD_KEYS = [
    "../x",
    "a/../../x",
    "model/../../../../../../../../../../../tmp/PWNED.txt",
    "/etc/passwd",
    "..\\x",
    "a\\..\\..\\x",
    "%2e%2e/x",
    "a/%2E%2e/b",
    "%252e%252e/x",  # encoded twice
    "a%2f..%2fb",
    "%2fetc/x",
    "a\0b",
    "a\nb",
    "C:/Windows/x",
    "x" * 256,
    "a/" * 2100 + "b",
    "",
    ".",
    "./",
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k[:24]))
def test_outside_names_are_refused_naming_the_key(key: str, tmp_path: Path) -> None:
    with pytest.raises(PathEscapeError) as e:
        confined(tmp_path, key, what="s3 object key")
    assert str(e.value).startswith("s3 object key")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("key", "rel"),
    [("a/b.json", "a/b.json"), ("./a//b", "a/b"), ("100%25 done.txt", "100%25 done.txt"), ("a..b", "a..b")],
)
def test_plain_names_are_kept(key: str, rel: str, tmp_path: Path) -> None:
    assert safe_relpath(key, what="k").as_posix() == rel
    assert confined(tmp_path, key, what="k") == tmp_path.resolve() / rel


def test_a_symlink_on_the_way_out_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "sub").symlink_to(outside)
    with pytest.raises(PathEscapeError, match=r"resolves outside .* through a symlink"):
        confined(root, "sub/x", what="member")
    (root / "inner").symlink_to(root / "real")  # a link that stays inside is fine
    assert confined(root, "inner/x", what="member") == root.resolve() / "inner" / "x"
    with pytest.raises(PathEscapeError, match=r"'sub': a symlink pointing outside"):
        check_tree(root, what="tree")


@pytest.mark.parametrize("name", ["victim", "model-1.2_b"])
def test_single_names(name: str) -> None:
    assert single_name(name, what="endpoint name") == name


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "", "-x", "a b", "a\0", "x" * 201])
def test_single_names_refused(name: str) -> None:
    with pytest.raises(PathEscapeError, match="endpoint name"):
        single_name(name, what="endpoint name")


def _zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16) | 0
            zf.writestr(info, "/etc")
    return path


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt", "..\\evil.txt"])
def test_zip_members_outside_are_refused(member: str, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "w.whl", {"ok/a.txt": b"a", member: b"pwned"})
    dest = tmp_path / "dest"
    with pytest.raises(PathEscapeError, match=r"w\.whl member"):
        extract_zip(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_zip_symlink_member_is_refused_and_good_zips_unpack(tmp_path: Path) -> None:
    with pytest.raises(PathEscapeError, match="is a symlink"):
        extract_zip(_zip(tmp_path / "s.zip", {}, symlink="link"), tmp_path / "d1")
    written = extract_zip(
        _zip(tmp_path / "g.zip", {"p/a.txt": b"a", "q/b.txt": b"b"}),
        tmp_path / "d2",
        select=lambda i: i.filename.startswith("p/"),
    )
    assert [p.relative_to(tmp_path / "d2").as_posix() for p in written] == ["p/a.txt"]
    assert (tmp_path / "d2" / "p" / "a.txt").read_bytes() == b"a"


def test_a_tampered_manifest_entry_is_not_followed(tmp_path: Path) -> None:
    final = tmp_path / "pub"
    staging = new_staging_dir(final)
    (staging / "a.txt").write_text("a")
    publish(staging, final)
    assert verify(final) == []
    manifest = final / "forgeline-manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["../../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    manifest.write_text(json.dumps(data))
    (problem,) = verify(final, deep=True)
    assert "'../../../etc/passwd': contains a '..' component" in problem


def test_publish_refuses_a_symlink_pointing_out(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    staging = new_staging_dir(tmp_path / "pub")
    (staging / "weights.bin").symlink_to(secret)
    with pytest.raises(PathEscapeError, match=r"'weights\.bin' is a symlink pointing outside"):
        publish(staging, tmp_path / "pub")
    assert not (tmp_path / "pub").exists()


# ---------------------------------------------------------------------------- hf:// via a hub cache


def _hub_repo(cache: Path, repo: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """A local Hugging Face hub cache holding ``repo`` at ``main`` (the layout the hub writes)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    for i, (name, data) in enumerate(files.items()):
        blob = folder / "blobs" / f"{i:064x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_hf_from_a_local_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    _hub_repo(cache, "org/tiny", {"config.json": b"{}", "sub/tokenizer.json": b"[]"})
    store = ModelStore(tmp_path / "artifacts", default_registry(), hf_cache_dir=cache)
    local = store.materialize("hf://org/tiny")
    assert (local / "config.json").read_bytes() == b"{}" and (local / "sub" / "tokenizer.json").is_file()
    assert not (local / "config.json").is_symlink() and verify(local, deep=True) == []


def test_hf_snapshot_pointing_outside_the_cache_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    snapshot = _hub_repo(cache, "evil/model", {"config.json": b"{}"})
    (snapshot / "tokenizer.json").symlink_to(secret)
    store = ModelStore(tmp_path / "artifacts", default_registry(), hf_cache_dir=cache)
    with pytest.raises(
        UriError, match=r"hf://evil/model: file 'tokenizer.json': points outside the hub cache"
    ):
        store.materialize("hf://evil/model")
    copies = [
        p for p in (tmp_path / "artifacts").rglob("*") if p.is_file() and p.read_bytes() == b"private key"
    ]
    assert copies == []


# ------------------------------------------------------------------------------- endpoint records


def _record(home: Path, name: str, pid: int, file_name: str | None = None, **extra: object) -> Path:
    from dataclasses import asdict

    from forgeline_operators.deploy.endpoint import EndpointRecord

    rec = EndpointRecord(
        name=name,
        url="http://127.0.0.1:1",
        port=1,
        pid=pid,
        pgid=os.getpgid(pid),
        repository=str(home / "repo"),
        model=name,
        triton_url="",
        log="",
        started_at=time.time(),
        **extra,  # type: ignore[arg-type]
    )
    path = home / "endpoints" / f"{file_name or name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(rec)))
    return path


def test_a_record_is_never_trusted_to_name_the_process(tmp_path: Path) -> None:
    """A record (edited, or left by a dead endpoint whose pid was reused) naming an unrelated process:
    stopping the endpoint must not signal that process or its group."""
    from forgeline_operators.deploy.endpoint import list_endpoints, stop_endpoint

    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        home = tmp_path / ".forgeline"
        _record(home, "victim", bystander.pid)
        assert list_endpoints(home, prune=False)[0].alive is False
        assert stop_endpoint(home, "victim", grace_s=0.5) is True
        time.sleep(0.3)
        assert bystander.poll() is None, "a process the record merely named was signalled"
        assert list_endpoints(home) == []
    finally:
        bystander.kill()
        bystander.wait()


def test_a_supervisor_of_another_home_or_start_time_is_not_ours(tmp_path: Path) -> None:
    from forgeline_operators.deploy.endpoint import _is_supervisor, _proc_start, _read_record

    home, other = tmp_path / "a", tmp_path / "b"
    # A process that looks like the endpoint supervisor of home `other` (argv only: it just sleeps).
    code = "import sys, time; time.sleep(60)"
    argv = [sys.executable, "-c", code, "forgeline_operators.deploy.endpoint", "--name", "web"]
    proc = subprocess.Popen([*argv, "--home", str(other)])
    try:
        time.sleep(0.2)
        start = _proc_start(proc.pid)
        assert start
        rec = _read_record(_record(home, "web", proc.pid, proc_start=start))
        assert rec is not None
        assert _is_supervisor(rec, other) is True
        assert _is_supervisor(rec, home) is False  # right process, another home
        stale = _read_record(_record(home, "web", proc.pid, proc_start=str(int(start) - 1)))
        assert stale is not None and _is_supervisor(stale, other) is False  # pid reused
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("name", ["../b/endpoints/victim", "..", "a/b", "/etc/x"])
def test_endpoint_names_stay_in_the_home(name: str, tmp_path: Path) -> None:
    from forgeline_operators.deploy.endpoint import stop_endpoint
    from forgeline_operators.promote.local import live_dir

    with pytest.raises(PathEscapeError, match="endpoint name"):
        stop_endpoint(tmp_path, name)
    with pytest.raises(PathEscapeError, match="endpoint name"):
        live_dir(tmp_path, name)


def test_a_record_naming_another_endpoint_is_ignored(tmp_path: Path) -> None:
    from forgeline_operators.deploy.endpoint import list_endpoints

    _record(tmp_path, "../../x", os.getpid(), file_name="x")
    assert list_endpoints(tmp_path, prune=False) == []


def test_cli_refuses_endpoint_names_that_leave_the_home(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from forgeline.cli import app

    runner = CliRunner()
    for args in (
        ["endpoints", "stop", "../../other/endpoints/victim", "--home", str(tmp_path)],
        ["serve", "builtin://tiny-llama", "--name", "../victim", "--home", str(tmp_path)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert "must be 1-200 letters" in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # refused before anything was built or written
