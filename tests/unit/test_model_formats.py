"""Model files as model URIs (issue 17): a registered ModelFormat converts a local file or an
``hf://ORG/NAME/FILE`` once into a published checkpoint; fingerprints follow the file's bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forgeline.artifacts import ModelStore, UriError, parse_uri, verify
from forgeline.registry import ModelFormat, OperatorRegistry, default_registry

CALLS: list[Path] = []


def _convert(path: Path, dest: Path) -> None:
    CALLS.append(path)
    (dest / "config.json").write_text(json.dumps({"from": path.name, "bytes": path.read_text()}))


FAKE = ModelFormat(name="fake", suffixes=(".fake",), version="3", convert=_convert)


def _store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "artifacts", OperatorRegistry(formats=[FAKE]), hf_cache_dir=tmp_path / "hub")


def test_a_local_model_file_is_converted_once(tmp_path: Path) -> None:
    CALLS.clear()
    f = tmp_path / "m.fake"
    f.write_text("v1")
    store = _store(tmp_path)
    fp = store.fingerprint(str(f))
    assert fp.startswith("fake:3:") and fp == store.fingerprint(str(f))
    out = store.materialize(str(f))
    assert json.loads((out / "config.json").read_text()) == {"from": "m.fake", "bytes": "v1"}
    assert verify(out, deep=True) == [] and store.materialize(str(f)) == out and len(CALLS) == 1
    f.write_text("v2")
    os.utime(f, ns=(1, 1))  # a different stat: re-hashed
    assert store.fingerprint(str(f)) != fp
    assert json.loads((store.materialize(str(f)) / "config.json").read_text())["bytes"] == "v2"


def test_an_unknown_model_file_says_what_is_converted(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_text("x")
    with pytest.raises(
        UriError, match=r"is a file, not a model directory; model files Forgeline converts: \.fake"
    ):
        _store(tmp_path).materialize(str(f))


def test_hf_file_uri_from_a_local_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_confine import _hub_repo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_repo(tmp_path / "hub", "org/gguf-repo", {"q4/model.fake": b"hub", "README.md": b"r"})
    assert parse_uri("hf://org/gguf-repo/q4/model.fake@main").target == "org/gguf-repo/q4/model.fake"
    out = _store(tmp_path).materialize("hf://org/gguf-repo/q4/model.fake")
    assert json.loads((out / "config.json").read_text()) == {"from": "model.fake", "bytes": "hub"}
    with pytest.raises(UriError, match=r"contains a '\.\.' component"):
        _store(tmp_path).materialize("hf://org/gguf-repo/../x.fake")


def test_the_shipped_formats_and_models_are_registered() -> None:
    reg = default_registry()
    assert reg.format_for("x.GGUF") is not None and reg.format_for("x.bin") is None
    smol = reg.model("smollm2-135m-instruct")
    assert smol is not None and smol.parameters == 134_515_008
