"""Manifests and atomic publication: per-file sha256/size, verification, staging cleanup, the stage
store's publish/lookup round trip, and atomic small-file writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from forgeline.artifacts import (
    MANIFEST_NAME,
    StageStore,
    clean_staging,
    digest_of,
    dir_digest,
    file_table,
    new_staging_dir,
    publish,
    read_manifest,
    verify,
    write_text_atomic,
)


def fill(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


FILES = {"config.json": '{"a": 1}', "weights/model.bin": "0123456789", "weights/extra.txt": ""}


def published(tmp_path: Path, files: dict[str, str] = FILES, name: str = "model") -> Path:
    final = tmp_path / name
    publish(fill(new_staging_dir(final), files), final, {"uri": "test://x"})
    return final


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_publish_writes_a_manifest_with_sha256_size_and_digest(tmp_path: Path) -> None:
    final = published(tmp_path)
    data = json.loads((final / MANIFEST_NAME).read_text())
    assert data["version"] == 1
    assert data["files"] == {rel: {"sha256": sha(text), "size": len(text)} for rel, text in FILES.items()}
    assert data["digest"] == digest_of(data["files"]) == dir_digest(final)
    assert data["meta"]["uri"] == "test://x" and "published_at" in data["meta"]
    m = read_manifest(final)
    assert m is not None and m.digest == data["digest"] and m.files == data["files"]
    assert verify(final) == [] and verify(final, deep=True) == []
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the staging directory was renamed


def test_digest_covers_paths_and_content_not_the_manifest(tmp_path: Path) -> None:
    a = file_table(fill(tmp_path / "a", FILES))
    b = file_table(fill(tmp_path / "b", {**FILES, "weights/model.bin": "0123456780"}))
    c = file_table(fill(tmp_path / "c", {"config.json": FILES["config.json"], "w/model.bin": "0123456789"}))
    assert MANIFEST_NAME not in file_table(published(tmp_path))
    assert len({digest_of(a), digest_of(b), digest_of(c)}) == 3
    # A prefix digest looks at one subdirectory, relative to it: same content elsewhere, same digest.
    d = file_table(fill(tmp_path / "d", {"other/model.bin": "0123456789", "other/extra.txt": ""}))
    assert digest_of(a, "weights") == digest_of(d, "other") == digest_of(d, "other/")
    assert digest_of(a, "weights") != digest_of(a)


def test_verify_detects_a_missing_file_and_a_size_change(tmp_path: Path) -> None:
    final = published(tmp_path)
    (final / "weights" / "model.bin").write_text("012345678")
    (final / "config.json").unlink()
    problems = verify(final)
    assert len(problems) == 2
    assert any(p.endswith("config.json: missing") for p in problems)
    assert any("model.bin: size 9 != 10" in p for p in problems)


def test_verify_deep_detects_a_content_change_of_the_same_size(tmp_path: Path) -> None:
    final = published(tmp_path)
    (final / "weights" / "model.bin").write_text("9876543210")
    assert verify(final) == []  # sizes only: cheap enough for every cache lookup
    assert verify(final, deep=True) == [f"{final / 'weights' / 'model.bin'}: sha256 mismatch"]


def test_verify_without_a_manifest(tmp_path: Path) -> None:
    fill(tmp_path / "raw", FILES)
    assert verify(tmp_path / "raw") == [f"{tmp_path / 'raw'}: no readable {MANIFEST_NAME}"]
    (tmp_path / "raw" / MANIFEST_NAME).write_text("{not json")
    assert read_manifest(tmp_path / "raw") is None


def dead_pid() -> int:
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        pid_max = 4_194_304
    return pid_max + 1  # above the kernel's limit: no process can have it


def test_clean_staging_removes_dead_writers_and_keeps_live_ones(tmp_path: Path) -> None:
    mine = new_staging_dir(tmp_path / "model")
    (mine / "half-written.bin").write_text("x")
    assert mine.name.startswith(".staging-model-") and f"-{os.getpid()}-" in mine.name
    dead = tmp_path / f".staging-model-{dead_pid()}-deadbeef"
    dead.mkdir()
    (dead / "half-written.bin").write_text("x")
    unowned = tmp_path / ".staging-model"  # no pid: nobody can still be writing it
    unowned.mkdir()
    finished = published(tmp_path, name="other-model")
    assert clean_staging(tmp_path) == 2
    assert mine.is_dir() and not dead.exists() and not unowned.exists()
    assert verify(finished) == []
    assert clean_staging(tmp_path / "absent") == 0


def test_publishing_onto_a_complete_destination_keeps_the_existing_one(tmp_path: Path) -> None:
    final = published(tmp_path, {"a.txt": "first"})
    first = read_manifest(final)
    staging = fill(new_staging_dir(final), {"a.txt": "second", "b.txt": "more"})
    m = publish(staging, final)
    assert first is not None and m.digest == first.digest
    assert (final / "a.txt").read_text() == "first" and not (final / "b.txt").exists()
    assert not staging.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publishing_onto_a_non_publication_raises(tmp_path: Path) -> None:
    final = fill(tmp_path / "model", {"stray.txt": "not a publication"})
    staging = fill(new_staging_dir(final), {"a.txt": "new"})
    with pytest.raises(OSError):
        publish(staging, final)


# ------------------------------------------------------------------------------------ stage store


def stage_result(store: StageStore, key: str, report: str = "ppl=3.2") -> Path:
    staging = store.staging(key)
    fill(staging, {"report/metrics.json": report, "merged/config.json": "{}", "merged/w.bin": "abc"})
    return staging


def test_stage_store_publish_lookup_round_trip(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    key = "k" * 64
    assert store.lookup(key) is None
    rec = store.publish(
        key,
        stage_result(store, key),
        values={"version": 3, "model_uri": "models:/m/3"},
        metrics={"perplexity": 3.2},
        meta={"stage": "eval", "components": {"params": "p"}},
    )
    found = store.lookup(key)
    assert found is not None
    assert found.key == rec.key == key and found.path == store.path(key) == tmp_path / "stages" / key
    assert found.digest == rec.digest == dir_digest(found.path)
    assert found.metrics == {"perplexity": 3.2}
    assert found.meta["stage"] == "eval" and found.meta["key"] == key
    assert set(found.outputs) == {"report", "merged", "version", "model_uri"}
    assert found.outputs["version"] == {"type": "value", "value": 3}
    assert found.output_path("merged") == found.path / "merged"
    assert found.output_path("version") is None and found.output_path("absent") is None
    assert (found.output_path("report") / "metrics.json").read_text() == "ppl=3.2"  # type: ignore[operator]
    table = file_table(found.path)
    assert found.output_digest("merged") == digest_of(table, "merged")
    assert found.output_digest("version") == "value:3"
    assert found.output_digest("model_uri") == 'value:"models:/m/3"'
    assert found.output_digest("absent") is None


def test_per_output_digests_are_stable_across_identical_publications(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    a = store.publish("a" * 64, stage_result(store, "a" * 64), values={}, metrics={}, meta={"n": 1})
    b = store.publish("b" * 64, stage_result(store, "b" * 64), values={}, metrics={}, meta={"n": 2})
    c = store.publish(
        "c" * 64, stage_result(store, "c" * 64, report="ppl=9.9"), values={}, metrics={}, meta={}
    )
    assert a.digest == b.digest != c.digest
    assert a.output_digest("merged") == b.output_digest("merged") == c.output_digest("merged")
    assert a.output_digest("report") == b.output_digest("report") != c.output_digest("report")


def test_a_damaged_stage_result_is_not_a_cache_hit(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    key = "d" * 64
    store.publish(key, stage_result(store, key), values={}, metrics={}, meta={})
    (store.path(key) / "merged" / "w.bin").unlink()
    assert store.lookup(key) is None


def test_remember_and_last(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    assert store.last("wf", "eval") is None
    store.remember("wf", "eval", "k1", {"params": "p1"})
    store.remember("wf", "eval", "k2", {"params": "p2"})
    assert store.last("wf", "eval") == {"key": "k2", "components": {"params": "p2"}}
    assert store.last("wf", "other") is None


def test_write_text_atomic(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "state.json"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]  # no temp files left behind


def test_republishing_repairs_a_damaged_publication(tmp_path: Path) -> None:
    final = published(tmp_path, {"a.txt": "first", "b.txt": "kept"})
    (final / "b.txt").unlink()
    assert verify(final)
    m = publish(fill(new_staging_dir(final), {"a.txt": "second", "b.txt": "new"}), final)
    assert verify(final) == [] and m.digest == dir_digest(final)
    assert (final / "b.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_stage_rerun_after_damage_is_found_again(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    key = "e" * 64
    store.publish(key, stage_result(store, key), values={}, metrics={}, meta={})
    (store.path(key) / "merged" / "w.bin").unlink()
    assert store.lookup(key) is None
    rec = store.publish(key, stage_result(store, key), values={}, metrics={}, meta={})
    assert verify(rec.path) == []
    assert store.lookup(key) is not None
