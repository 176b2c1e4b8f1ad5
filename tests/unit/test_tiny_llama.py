"""Unit tests of ``builtin://tiny-llama`` and the shipped datasets in ``workflows/data``.

They load the real shipped checkpoint offline and measure it: parameter count, tokenizer and chat
template, and perplexity on ``corpus_sample.jsonl`` against a random initialisation of the same config.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from forgeline_operators.models import tiny_llama
from forgeline_operators.models.tiny_llama import SOURCE

DATA = Path(__file__).resolve().parents[2] / "workflows" / "data"
# Measured: the shipped model 35.6 on corpus_sample (make_tiny_llama.py reports 35.7 on the whole
# held-out slice); a random init of the same config ~4150 (the vocabulary is 4096). Wide margins.
TRAINED_PPL_MAX = 100.0
RANDOM_PPL_MIN = 2000.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    dest = tmp_path_factory.mktemp("tiny") / "does" / "not" / "exist"
    SOURCE.materialize(dest)
    return dest


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)


def _jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def test_source_is_registered_shape() -> None:
    assert SOURCE.name == "tiny-llama"
    assert SOURCE.description


def test_fingerprint_is_stable_and_tracks_content(tmp_path: Path) -> None:
    first = SOURCE.fingerprint()
    assert first == SOURCE.fingerprint()
    assert len(first) == 64
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama.CHECKPOINT_DIR, copy)
    assert tiny_llama.directory_fingerprint(copy) == first
    config = copy / "config.json"
    config.write_bytes(config.read_bytes() + b"\n")
    changed = tiny_llama.directory_fingerprint(copy)
    assert changed != first
    config.rename(copy / "config2.json")  # same bytes, other name
    assert tiny_llama.directory_fingerprint(copy) not in (first, changed)


def test_materialize_writes_what_is_fingerprinted(checkpoint: Path) -> None:
    assert tiny_llama.directory_fingerprint(checkpoint) == SOURCE.fingerprint()
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in checkpoint.iterdir()) < 10 * 2**20


def test_parameter_count_is_the_loaded_models(loaded: tuple[Any, Any]) -> None:
    model, _ = loaded
    assert model.num_parameters() == SOURCE.parameters
    assert 1_000_000 < SOURCE.parameters < 2_000_000


def test_tokenizer_round_trips_and_template_renders(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    text = "Return the floor of self, as an integer. Ünïcödé → ok"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == model.config.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == model.config.vocab_size == 4096
    assert tok.eos_token_id == model.config.eos_token_id != tok.pad_token_id
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Repeat after me: red dog"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<s><|user|>\nRepeat after me: red dog</s>\n<|assistant|>\n"
    role_ids = tok("<|user|>", add_special_tokens=False)["input_ids"]
    assert len(role_ids) == 1  # role markers are single special tokens


def test_generation_stops_and_decodes(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    x = tok("The function returns", return_tensors="pt")
    out = model.generate(**x, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > x["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)


def test_shipped_model_is_pretrained_and_random_init_is_not(loaded: tuple[Any, Any]) -> None:
    from transformers import AutoModelForCausalLM

    from forgeline_operators.models._build import perplexity

    model, tok = loaded
    texts = [row["text"] for row in _jsonl("corpus_sample.jsonl")]
    trained = perplexity(model, tok, texts)
    fresh = AutoModelForCausalLM.from_config(model.config)
    random_init = perplexity(fresh, tok, texts)
    assert trained < TRAINED_PPL_MAX, trained
    assert random_init > RANDOM_PPL_MIN, random_init


@pytest.mark.parametrize(
    ("name", "keys", "min_rows"),
    [
        ("chat_sft.jsonl", {"prompt", "completion"}, 200),
        ("held_out.jsonl", {"prompt", "completion"}, 64),
        ("prefs.jsonl", {"prompt", "chosen", "rejected"}, 200),
        ("corpus_sample.jsonl", {"text"}, 100),
    ],
)
def test_dataset_files_parse(name: str, keys: set[str], min_rows: int) -> None:
    rows = _jsonl(name)
    assert len(rows) >= min_rows
    for row in rows:
        assert set(row) == keys, row
        assert all(isinstance(v, str) and v.strip() == v and v for k, v in row.items() if k != "text"), row
        assert all(row[k].strip() for k in keys), row
    if name == "prefs.jsonl":
        assert all(r["chosen"] != r["rejected"] for r in rows)


def test_held_out_is_disjoint_from_training_data() -> None:
    held = {r["prompt"] for r in _jsonl("held_out.jsonl")}
    assert held.isdisjoint(r["prompt"] for r in _jsonl("chat_sft.jsonl"))
    assert held.isdisjoint(r["prompt"] for r in _jsonl("prefs.jsonl"))


def test_corpus_sample_was_not_pretrained_on() -> None:
    from forgeline_operators.models import _corpus

    train, _ = _corpus.split_documents(_corpus.read_corpus(tiny_llama.CHECKPOINT_DIR.with_name("corpus")))
    trained = set(train)
    assert not any(r["text"] in trained for r in _jsonl("corpus_sample.jsonl"))
