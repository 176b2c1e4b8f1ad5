"""Registered-model URIs: ``mlflow://models/...`` and MLflow's own ``models:/...`` parse to the same
version, bad forms are refused at parse time with the accepted forms in the message, and the one store
factory (``forgeline.runtime.model_store``) resolves both against a real MLflow SQLite registry, with
errors that name the URI and what the registry has instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeline.artifacts import ModelStore, RegistryRef, UriError, parse_uri
from forgeline.registry import default_registry
from forgeline.runtime import model_store
from forgeline.tracking import Tracker, register_version, resolve_settings


@pytest.mark.parametrize(
    ("uri", "ref"),
    [
        ("models:/tiny/3", RegistryRef("tiny", version=3)),
        ("mlflow://models/tiny/3", RegistryRef("tiny", version=3)),
        ("models:/tiny@candidate", RegistryRef("tiny", alias="candidate")),
        ("mlflow://models/tiny@candidate", RegistryRef("tiny", alias="candidate")),
        ("models:/my-model.v2@prod_1", RegistryRef("my-model.v2", alias="prod_1")),
    ],
)
def test_both_spellings_name_the_same_version(uri: str, ref: RegistryRef) -> None:
    parsed = parse_uri(uri)
    assert parsed.scheme == "mlflow" and parsed.ref == ref and parsed.uri == uri
    assert parsed == parse_uri(str(ref))  # models:/ is an alias of mlflow://models/, not another scheme
    assert str(ref).startswith("mlflow://models/")


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("models:/tiny", ""),  # neither a version nor an alias
        ("models:/tiny/Production", "'Production' is not a version number"),  # MLflow's old stages
        ("models:/tiny/latest", "'latest' is not a version number"),
        ("models:/tiny/0", "'0' is not a version number"),
        ("models:/a/b/1", ""),  # registered names cannot hold '/'
        ("models:/@candidate", ""),
        ("models:/tiny@", ""),
        ("models:/tiny@a@b", ""),
        ("mlflow://tiny@candidate", ""),  # models/ missing
        ("mlflow://models/", ""),
    ],
)
def test_bad_registry_uris_say_what_is_expected(uri: str, why: str) -> None:
    with pytest.raises(UriError) as e:
        parse_uri(uri)
    message = str(e.value)
    assert message.startswith(repr(uri))
    assert "models:/NAME/VERSION" in message and "mlflow://models/NAME@ALIAS" in message
    assert why in message


def test_a_path_that_only_looks_like_a_scheme_stays_a_path(tmp_path: Path) -> None:
    assert parse_uri("models/tiny/1", tmp_path).scheme == "local"  # no colon: a relative directory
    with pytest.raises(UriError, match=r"unknown scheme 'gs' \(use .*mlflow:// or models:/\)"):
        parse_uri("gs://b/m")


def test_a_bare_store_refuses_registry_uris_instead_of_guessing(tmp_path: Path) -> None:
    """Without the runtime's resolver a fingerprint of the name alone would hide a moved alias."""
    bare = ModelStore(tmp_path, default_registry())
    for call in (bare.fingerprint, bare.materialize):
        with pytest.raises(
            UriError, match=r"'models:/tiny/1': scheme 'mlflow' is not resolvable .*model_store"
        ):
            call("models:/tiny/1")


@pytest.fixture
def registry(home: Path, tmp_path: Path) -> dict[str, object]:
    """Version 1 (alias candidate) and 2 of `tiny`, each a directory registered by reference."""
    tracker = Tracker(resolve_settings(None, "", home).uri)
    dirs = []
    for i in (1, 2):
        d = tmp_path / f"v{i}"
        d.mkdir()
        (d / "config.json").write_text("{}")
        dirs.append(d)
        register_version(
            tracker,
            "tiny",
            d.as_uri(),
            None,
            {"forgeline.sha256": f"sha{i}"},
            alias="candidate" if i == 1 else None,
        )
    return {"store": model_store(home), "dirs": dirs}


def test_the_factory_resolves_both_spellings_to_one_version(registry: dict[str, object]) -> None:
    store = registry["store"]
    assert isinstance(store, ModelStore)
    dirs = registry["dirs"]
    assert isinstance(dirs, list)
    fingerprints = {
        store.fingerprint(u) for u in ("models:/tiny/1", "mlflow://models/tiny/1", "models:/tiny@candidate")
    }
    assert fingerprints == {"mlflow:tiny/1:sha1"}  # one version, one cache key, whatever the spelling
    assert store.fingerprint("models:/tiny/2") == "mlflow:tiny/2:sha2"
    assert store.materialize("models:/tiny@candidate") == dirs[0]
    assert store.materialize("models:/tiny/2") == dirs[1]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/tiny@production", "'models:/tiny@production': model 'tiny' has no alias 'production' "
         "(aliases: candidate -> 1; versions: 1, 2)"),
        ("mlflow://models/tiny/7",
         "'mlflow://models/tiny/7': model 'tiny' has no version 7 (versions: 1, 2)"),
        ("models:/tinny/1", "'models:/tinny/1': no registered model 'tinny' in sqlite:///"),
    ],
)  # fmt: skip
def test_what_does_not_exist_is_named_with_what_does(
    registry: dict[str, object], uri: str, message: str
) -> None:
    store = registry["store"]
    assert isinstance(store, ModelStore)
    with pytest.raises(UriError) as e:
        store.materialize(uri)
    assert str(e.value).startswith(message)
    if "tinny" in uri:
        assert str(e.value).endswith("(registered: tiny)")


def test_a_home_without_a_store_is_not_given_an_empty_one(tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    with pytest.raises(UriError, match=r"'models:/tiny/1': no MLflow store at .*mlflow\.db"):
        model_store(home).fingerprint("models:/tiny/1")
    assert not (home / "mlflow.db").exists()


def test_serve_names_the_endpoint_after_the_registered_model() -> None:
    from forgeline._cli_serving import _endpoint_name

    assert _endpoint_name("models:/quickstart-tiny-llama/1") == "quickstart-tiny-llama"
    assert _endpoint_name("mlflow://models/tiny.v2@candidate") == "tiny-v2"
    assert _endpoint_name("builtin://tiny-llama") == "tiny-llama"
    assert _endpoint_name("hf://org/name@rev") == "name"


def test_a_submitted_workflow_may_name_models_uris(tmp_path: Path) -> None:
    """The REST API refuses relative paths in submissions; models:/NAME/1 has no '://' but is no path."""
    from forgeline.api._safety import model_uri_problems
    from forgeline.spec import load_workflow

    (tmp_path / "corpus.jsonl").write_text('{"text": "a"}\n')
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "name: w\nmodel: {base: 'models:/tiny/1'}\ndata:\n  corpus: {path: corpus.jsonl, format: text}\n"
        "stages:\n  - {name: e, kind: evaluate, model: 'models:/tiny@candidate', dataset: corpus}\n"
        "  - {name: f, kind: evaluate, model: 'rel/dir', dataset: corpus}\n"
    )
    problems = model_uri_problems(load_workflow(wf), tmp_path / "artifacts", "wf.yaml")
    assert [p.field for p in problems] == ["stages[1].model"]  # only the relative path
