"""``s3://`` model URIs against a real S3 API over HTTP (moto's server on loopback, as MinIO or AWS
would be reached through ``AWS_ENDPOINT_URL``): listing-based fingerprints that change when an object
changes, verified downloads published with a manifest, and clear errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.artifacts import ModelStore, UriError, dir_digest
from forgeline.registry import default_registry
from processes import kill_session, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            return False

    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "forgeline-test",
        "AWS_SECRET_ACCESS_KEY": "forgeline-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_for(up, "the S3 server", deadline_s=60, proc=proc)
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        kill_session(proc.pid)
        proc.wait(timeout=30)


def _upload(src: Path, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(src)}")


def test_s3_model_uri_fingerprint_download_and_change(s3_endpoint: str, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "artifacts", default_registry())
    tiny = store.materialize("builtin://tiny-llama")
    _upload(tiny, "models", "team/tiny-llama")
    uri = "s3://models/team/tiny-llama"

    first_fp = store.fingerprint(uri)
    assert first_fp.startswith("s3:models/team/tiny-llama:") and first_fp == store.fingerprint(uri)
    local = store.materialize(uri)
    # Every file arrived intact (same content digest as the source, manifest excluded).
    assert dir_digest(local) == dir_digest(tiny)
    assert (local / "config.json").read_text() == (tiny / "config.json").read_text()
    assert store.materialize(uri) == local  # published once, found again

    # A changed object changes the fingerprint (so dependent cache keys) and the materialized copy.
    import boto3

    boto3.client("s3").put_object(Bucket="models", Key="team/tiny-llama/README.md", Body=b"v2\n")
    assert store.fingerprint(uri) != first_fp
    second = store.materialize(uri)
    assert second != local and (second / "README.md").read_text() == "v2\n"

    with pytest.raises(UriError, match=r"s3://models/team/nothing-here: no objects under that prefix"):
        store.fingerprint("s3://models/team/nothing-here")
    with pytest.raises(UriError, match=r"cannot list s3://no-such-bucket/x: .*NoSuchBucket"):
        store.materialize("s3://no-such-bucket/x")


CRAFTED_KEYS = [
    "model/../../../../../../../../../../../{dir}/PWNED.txt",
    "model/{abs}/PWNED.txt",
    "model/..\\..\\PWNED.txt",
    "model/%2e%2e/%2e%2e/PWNED.txt",
    "model/" + "x" * 300 + "/PWNED.txt",
]


@pytest.mark.parametrize("crafted", CRAFTED_KEYS, ids=["dotdot", "absolute", "backslash", "encoded", "long"])
def test_s3_keys_outside_the_download_directory_are_refused(
    s3_endpoint: str, tmp_path: Path, crafted: str
) -> None:
    """A listing with a key that would land outside the download directory (zip-slip through S3): the
    materialization fails naming the key, and no file appears anywhere outside."""
    import boto3

    victim = tmp_path / "victim"
    victim.mkdir()
    key = crafted.format(dir=str(victim).lstrip("/"), abs=str(victim))
    bucket = f"evil-{CRAFTED_KEYS.index(crafted)}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="model/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=key, Body=b"pwned")
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="model/")["Contents"]]
    assert key in listed  # the server really lists the crafted key
    store = ModelStore(tmp_path / "artifacts", default_registry())
    with pytest.raises(UriError) as e:
        store.materialize(f"s3://{bucket}/model")
    assert f"s3://{bucket}/{key[:60]}" in str(e.value) and "refusing to download" in str(e.value)
    with pytest.raises(UriError):
        store.fingerprint(f"s3://{bucket}/model")  # the plan refuses it too, before any download
    written = [p for p in tmp_path.rglob("PWNED.txt")] + [p for p in Path("/").glob("PWNED.txt")]
    assert written == [] and list(victim.iterdir()) == []


def test_s3_prefix_is_a_folder(s3_endpoint: str, tmp_path: Path) -> None:
    """`s3://b/model` takes `model/...` only, not the objects of a sibling `model-old/...`."""
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="prefixes")
    client.put_object(Bucket="prefixes", Key="model/config.json", Body=b"{}")
    client.put_object(Bucket="prefixes", Key="model-old/weights.bin", Body=b"old")
    local = ModelStore(tmp_path / "artifacts", default_registry()).materialize("s3://prefixes/model")
    assert sorted(p.name for p in local.iterdir() if p.name != "forgeline-manifest.json") == ["config.json"]
