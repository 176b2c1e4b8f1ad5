"""The prune stage and the structural surgery under it, on the shipped tiny Llama (4 query heads in 2
GQA groups, MLP 512, 2 layers). The surgery is checked exactly: keeping everything reproduces the
model's logits, and a pruned model equals the original with the dropped channels / heads zeroed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from forgeline.artifacts import sha256_file
from forgeline.runtime.context import DatasetInput, MemorySink, OperatorError, StageContext
from forgeline_operators.lib.surgery import evenly_spaced, rebuild
from forgeline_operators.models.tiny_llama import SOURCE
from forgeline_operators.prune.operator import run
from forgeline_operators.prune.spec import PruneStage

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[2] / "workflows" / "data"
IDS = torch.tensor([[1, 50, 300, 7, 999, 42, 5, 77]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    SOURCE.materialize(d)
    return d


@pytest.fixture(scope="module")
def model(tiny: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(tiny)).eval()


def logits(m: Any) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=IDS).logits


def context(tmp: Path, model_dir: Path, **fields: Any) -> StageContext:
    spec = {
        "name": "p",
        "kind": "prune",
        "calibration": {"dataset": "corpus", "samples": 16, "max_seq_len": 128},
        **fields,
    }
    datasets = {
        "corpus": DatasetInput(
            "corpus", DATA / "corpus_sample.jsonl", "text", sha256_file(DATA / "corpus_sample.jsonl")
        )
    }
    (tmp / "out").mkdir(parents=True)
    (tmp / "work").mkdir()
    return StageContext(
        stage=PruneStage.model_validate(spec),
        workflow=None,
        output_dir=tmp / "out",
        work_dir=tmp / "work",
        sink=MemorySink(),
        resolve=lambda ref: model_dir,
        values=lambda ref: None,
        datasets=datasets,
    )


def test_rebuild_keeping_everything_is_exact(model: Any) -> None:
    assert torch.equal(logits(rebuild(model)), logits(model))


def test_pruned_width_equals_zeroed_original(model: Any) -> None:
    channels = {i: list(range(0, 512, 2)) for i in range(2)}
    heads = {
        i: [1, 2] for i in range(2)
    }  # one query head from each GQA group (heads 0-1 -> kv 0, 2-3 -> kv 1)
    pruned = rebuild(model, mlp_channels=channels, heads=heads)
    assert pruned.config.intermediate_size == 256 and pruned.config.num_attention_heads == 2
    assert pruned.config.num_key_value_heads == 2 and pruned.config.head_dim == 32
    zeroed = AutoModelForCausalLM.from_config(model.config)
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in zeroed.model.layers:
            layer.mlp.down_proj.weight[:, 1::2] = 0  # dropped channels contribute nothing
            o = layer.self_attn.o_proj.weight
            o[:, 0:32] = 0  # dropped heads 0 and 3
            o[:, 96:128] = 0
    torch.testing.assert_close(logits(pruned), logits(zeroed.eval()), atol=1e-5, rtol=1e-5)


def test_evenly_spaced_layers() -> None:
    assert (
        evenly_spaced(8, 3) == [0, 4, 7]
        and evenly_spaced(2, 1) == [0]
        and evenly_spaced(4, 4) == [0, 1, 2, 3]
    )


def test_prune_stage_writes_a_smaller_loadable_llama_and_logs_perplexity(tiny: Path, tmp_path: Path) -> None:
    ctx = context(
        tmp_path, tiny, target={"intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 1}
    )
    result = run(ctx)
    m = result.metrics
    assert m["params_after"] < m["params_before"] and m["size_bytes_after"] < m["size_bytes_before"]
    assert m["perplexity_after"] > m["perplexity_before"] > 1 and m["eval_kl"] > 0
    out = result.outputs["checkpoint"]
    assert isinstance(out, Path)
    pruned = AutoModelForCausalLM.from_pretrained(str(out))
    c = pruned.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (
        1,
        256,
        2,
        2,
    )
    assert int(sum(p.numel() for p in pruned.parameters())) == m["params_after"]
    meta = json.loads((out / "forgeline_prune.json").read_text())
    assert len(meta["kept_layers"]) == 1
    assert ctx.sink.params["pruned.num_hidden_layers"] == 1  # type: ignore[attr-defined]


def test_targets_that_cannot_be_met_say_why(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="multiple of num_key_value_heads=2"):
        run(context(tmp_path / "a", tiny, target={"num_attention_heads": 3}))
    with pytest.raises(OperatorError, match="exceeds the model's 512"):
        run(context(tmp_path / "b", tiny, target={"intermediate_size": 1024}))
    with pytest.raises(ValidationError, match="at least one"):
        PruneStage.model_validate(
            {"name": "p", "kind": "prune", "target": {}, "calibration": {"dataset": "c"}}
        )


def test_plan_estimates_prune_and_distill_and_keeps_them_off_gpus(tmp_path: Path) -> None:
    from forgeline.artifacts import ModelStore, StageStore
    from forgeline.plan import Planner
    from forgeline.registry import default_registry
    from forgeline.spec import load_workflow

    example = Path(__file__).resolve().parents[2] / "workflows" / "examples" / "prune-distill-cpu.yaml"
    registry = default_registry()
    plan = Planner(
        load_workflow(example), registry, ModelStore(tmp_path, registry), StageStore(tmp_path)
    ).build()
    assert not plan.problems()
    prune, recover = (plan.stage(n) for n in ("prune", "recover"))
    assert prune.memory is not None and recover.memory is not None
    assert "teacher (frozen) + its logits" in recover.memory.parts
    assert recover.memory.per_device_bytes > prune.memory.per_device_bytes
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(
        example.read_text()
        .replace("device: cpu", "device: gpu")
        .replace("../data/", f"{example.parent.parent}/data/")
    )
    problems = [
        str(p)
        for p in Planner(load_workflow(gpu), registry, ModelStore(tmp_path, registry), StageStore(tmp_path))
        .build()
        .problems()
    ]
    assert any("prune does not run on GPUs" in p for p in problems)
    assert any("distill does not run on GPUs" in p for p in problems)
