"""megatron backend: HF Llama <-> megatron conversion, and HF/PEFT exports that load elsewhere.

- logits of the converted GPTModel (TP=1) equal HF's: max |diff| < 1e-4 on logits of size ~10
  (measured 1.6e-5, float32 reduction order);
- HF -> megatron shards (TP=2 x PP=2, GQA groups, gate/up halves) -> HF is the identity, bit for bit;
- after training at TP=2 (LoRA) or TP=2 x PP=2 (full), the exported PEFT adapter / merged checkpoint,
  loaded by ``peft`` / ``transformers``, give the held-out loss megatron computed (rel 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from forgeline_operators.data import IGNORE_INDEX, pad_token_id  # noqa: E402
from forgeline_operators.finetune.megatron import convert, engine, launch, loop  # noqa: E402
from forgeline_operators.finetune.megatron.model import build_model, shape_from_hf, transformer_config  # noqa: E402
from forgeline_operators.finetune.spec import LoraSpec  # noqa: E402
from forgeline_operators.lib.hf_checkpoint import load_tokenizer  # noqa: E402
from forgeline_operators.lib.train_rows import sft_features  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "operators" / "forgeline_operators" / "models" / "tiny_llama"
DATA = Path(__file__).resolve().parents[2] / "workflows" / "data" / "chat_sft.jsonl"
# partial targets: exercises the masked fused QKV / fc1 halves and their PEFT export
PARTIAL_LORA = LoraSpec(
    r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"]
)
SHAPE = shape_from_hf(json.loads((TINY / "config.json").read_text()))


def _megatron_keys(n_layers: int, first: bool, last: bool) -> list[str]:
    keys = ["embedding.word_embeddings.weight"] if first else []
    for i in range(n_layers):
        keys += [
            f"decoder.layers.{i}.{n}.weight"
            for n in (
                "input_layernorm",
                "self_attention.linear_qkv",
                "self_attention.linear_proj",
                "pre_mlp_layernorm",
                "mlp.linear_fc1",
                "mlp.linear_fc2",
            )
        ]
    if last:
        keys += ["decoder.final_layernorm.weight", "output_layer.weight"]
    return keys


def test_hf_to_tp2_pp2_shards_and_back_is_the_identity() -> None:
    hf = convert.load_hf_state(TINY)
    pieces: list[convert.Piece] = []
    for stage in range(2):
        for rank in range(2):
            keys = _megatron_keys(1, stage == 0, stage == 1)
            local = convert.hf_to_local(hf, SHAPE, keys, rank, 2, stage)
            qkv = local["decoder.layers.0.self_attention.linear_qkv.weight"]
            assert qkv.shape == (128, 128)  # one of the two GQA groups
            pieces += convert.local_to_pieces(local, SHAPE, rank, 2, stage, stage == 0)
    back = convert.join_pieces(pieces)
    assert set(back) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def _logits(_rank: int) -> Any:
    model = build_model(SHAPE, transformer_config(SHAPE, 1, 1))
    model.load_state_dict(
        convert.hf_to_local(convert.load_hf_state(TINY), SHAPE, list(model.state_dict()), 0, 1, 0),
        strict=False,
    )
    ids = torch.randint(0, SHAPE.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    from forgeline_operators.finetune.megatron import _cpu_compat

    with torch.no_grad(), _cpu_compat.cpu_mode():
        return ids, model(ids, torch.arange(24).expand(2, -1), None)


def test_megatron_logits_equal_hf_at_tp1() -> None:
    from transformers import AutoModelForCausalLM

    ids, logits = launch.run_world(1, 1, 1, _logits, timeout_s=120)[0]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)(ids).logits
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < 1e-4


def _hf_loss(model: Any, feats: list[dict[str, list[int]]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for f in feats:
            logits = model(torch.tensor([f["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(f["labels"][1:])
            keep = labels != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp", "lora"), [(2, 1, PARTIAL_LORA), (2, 2, None)])
def test_trained_exports_load_in_peft_and_transformers(tmp_path: Path, tp: int, pp: int, lora: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(TINY)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:40]]
    feats = sft_features(tok, rows[:32], rows[32:], "sft", 48)
    settings = engine.Settings(
        tp=tp, pp=pp, lr=3e-3, total_steps=3, micro_batch_size=4, grad_accum=1, lora=lora
    )
    run = loop.Run(
        settings=settings,
        shape=SHAPE,
        hf_dir=TINY,
        train=feats.train,
        eval=feats.eval,
        pad_id=pad_token_id(tok),
        steps=3,
        export_dir=tmp_path,
    )
    result = launch.run_world(tp * pp, tp, pp, lambda _r: loop.run(run), timeout_s=240)[0]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert _hf_loss(merged, feats.eval) == pytest.approx(result.eval_loss, rel=1e-4)
    if lora is not None:
        assert result.outputs == ["adapter", "merged"]
        base = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        assert _hf_loss(peft_model, feats.eval) == pytest.approx(result.eval_loss, rel=1e-4)
        with peft_model.disable_adapter():  # the adapter really changes the model
            assert _hf_loss(peft_model, feats.eval) != pytest.approx(result.eval_loss, rel=1e-4)


def test_layouts_and_models_it_cannot_split_fail_with_the_fix() -> None:
    from forgeline.runtime.context import OperatorError
    from forgeline_operators.finetune.megatron import lora
    from forgeline_operators.finetune.megatron.model import check_layout

    with pytest.raises(OperatorError, match=r"num_key_value_heads=2 is not divisible by tp=4"):
        check_layout(SHAPE, 4, 1)
    with pytest.raises(OperatorError, match=r"num_hidden_layers=2 is not divisible by pp=3"):
        check_layout(SHAPE, 1, 3)
    with pytest.raises(OperatorError, match=r"converts Llama checkpoints; this one is 'gpt2'"):
        shape_from_hf({"model_type": "gpt2"})
    with pytest.raises(OperatorError, match=r"rope_type 'llama3' is not supported"):
        shape_from_hf(
            {**json.loads((TINY / "config.json").read_text()), "rope_parameters": {"rope_type": "llama3"}}
        )
    with pytest.raises(OperatorError, match=r"\['qkv'\] are not Llama projections"):
        lora.targets(LoraSpec(target_modules=["qkv"]))
    assert lora.targets(LoraSpec(target_modules=["v_proj"])) == {"self_attention.linear_qkv": ("v_proj",)}
