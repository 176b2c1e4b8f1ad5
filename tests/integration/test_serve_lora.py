"""Runtime LoRA and speculative decoding from the spec, end to end: a ``serve`` stage with ``adapters:``
and ``speculative:`` builds the repository (router + one engine per adapter, scale ``lora_alpha / r``
read from adapter_config.json, a draft model in each engine), the real tritonserver serves it behind
the OpenAI front, and ``model: <adapter>`` gives HF's greedy tokens with the adapter merged, while the
base model id still gives the base model's tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from forgeline.runtime.context import MemorySink, StageContext
from forgeline.spec._models import Workflow
from forgeline_operators.deploy.endpoint import EndpointRecord, start_detached, stop_endpoint
from forgeline_operators.models.tiny_llama import SOURCE
from forgeline_operators.serve.operator import run as serve
from forgeline_operators.serve.spec import ServeStage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPTS = ["Once upon a time", "The quick brown fox"]
MAX_TOKENS = 12
ADAPTER_REF = "${stages.sft.outputs.adapter}"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model and a LoRA adapter on it (random A and B: the adapter visibly changes outputs)."""
    import torch
    from optimum.exporters.openvino import main_export
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    SOURCE.materialize(root / "tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(root / "tiny", dtype=torch.float32)
    # r=4, alpha=8: scale 2, so serving at alpha 1 (the runtime's default) would not match HF.
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(root / "adapter")
    # The serve stage takes the build stage's IR here. Exporting in-process (torch is loaded already)
    # takes half the time of the optimum-cli subprocess the stage runs for an HF checkpoint.
    main_export(str(root / "tiny"), root / "ir", task="text-generation-with-past", convert_tokenizer=True)
    return root / "tiny", root / "adapter"


def _hf_greedy(model_dir: Path, adapter: Path | None) -> list[str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.eval().generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(str(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)))
    return out


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, Path]) -> Iterator[EndpointRecord]:
    base, adapter = models
    # Speculative decoding on too (the model drafts for itself, so the export is reused): greedy
    # outputs must not change, with or without the adapter (whose engine drafts without it).
    stage = ServeStage.model_validate(
        {
            "name": "llm",
            "kind": "serve",
            "model": "${model}",
            "adapters": {"sql": ADAPTER_REF},
            "speculative": {"draft": "${model}", "num_assistant_tokens": 3},
        }
    )
    workflow = Workflow.model_validate(
        {"name": "lora", "model": {"base": str(base)}, "stages": [stage.model_dump(by_alias=True)]}
    )
    work = tmp_path_factory.mktemp("serve")
    (work / "out").mkdir()
    (work / "work").mkdir()
    paths = {"${model}": base.with_name("ir"), ADAPTER_REF: adapter}
    ctx = StageContext(
        stage, workflow, work / "out", work / "work", MemorySink(), paths.__getitem__, lambda r: None, {}
    )
    result = serve(ctx)
    repo = Path(result.outputs["repository"])
    manifest = json.loads((repo / "forgeline-repository.json").read_text())
    assert manifest["models"] == ["llm", "llm__base", "llm__sql"] and manifest["adapters"] == ["sql"]
    assert ctx.sink.params["lora_scales"] == "sql=2"  # type: ignore[attr-defined]
    assert manifest["speculative"] == {"num_assistant_tokens": 3}
    home = tmp_path_factory.mktemp("home")
    rec = start_detached(home, repo, "lora", served_name="tiny")
    try:
        yield rec
    finally:
        stop_endpoint(home, "lora")


def _complete(url: str, model: str) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    return texts


def test_adapter_by_model_id_equals_hf_merged(endpoint: EndpointRecord, models: tuple[Path, Path]) -> None:
    base, adapter = models
    ids = [m["id"] for m in httpx.get(f"{endpoint.url}/v1/models").json()["data"]]
    assert ids == ["tiny", "sql"]
    with_adapter = _complete(endpoint.url, "sql")
    assert with_adapter == _hf_greedy(base, adapter)
    plain = _complete(endpoint.url, "tiny")
    assert plain == _hf_greedy(base, None)
    assert plain != with_adapter
    # A streamed request through the router gives the same text, chunk by chunk.
    body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    chunks = []
    with httpx.stream("POST", f"{endpoint.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(chunks) == with_adapter[0]

    # The front sends each request straight to its engine (so a client that leaves cancels it there);
    # the router model still serves clients that talk to Triton with a lora_name.
    def successes(model: str) -> int:
        stats = httpx.get(f"{endpoint.triton_url}/v2/models/{model}/stats", timeout=10).json()
        return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])

    assert successes("llm") == 0
    assert successes("llm__sql") >= len(PROMPTS) + 1 and successes("llm__base") >= len(PROMPTS)
    direct = {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS, "lora_name": "sql", "stream": True}
    pieces = []
    with httpx.stream(
        "POST", f"{endpoint.triton_url}/v2/models/llm/generate_stream", json=direct, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                pieces.append(json.loads(line[6:]).get("text_output", ""))
    assert "".join(pieces) == with_adapter[0]
    assert successes("llm") == 1
