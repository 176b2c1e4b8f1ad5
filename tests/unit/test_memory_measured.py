"""The planner's per-device memory estimate against what real megatron-core CPU runs hold, per rank.

Each layout trains the shipped tiny Llama as forked gloo ranks (``launch.run_world``) and measures:

* model state, exactly: bytes of the rank's parameters, of its DDP gradient buffers (fp32) and of its
  Adam moments (every non-scalar tensor in the optimizer state after a step);
* activations: the peak over one training step (forward and backward of every micro-batch, 1F1B
  under pp > 1) of the bytes of tensors autograd holds for backward, counted per storage (views
  share one) through ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded. A storage is
  counted from the moment it is saved until autograd drops it.

The estimate is :func:`forgeline.plan._estimates.finetune_memory` for the same shape and layout. Its
``logits`` part is the fp32 logits plus their gradient; only the logits are saved for backward (the
gradient lives during the backward pass), so the comparison takes half of it. Tolerances: model
state exact for full fine-tuning; LoRA within 2 % (megatron shares one A matrix across a fused QKV or
fc1 linear where PEFT has one per projection); activations within -10 %..+15 % (left out of the
estimate: the final norm's and the output layer's inputs, token ids and labels -- measured +1..+10 %;
under LoRA a frozen projection needs slightly less -- measured -5 % at tp2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from forgeline.plan._estimates import finetune_memory, shape_from_dir  # noqa: E402
from forgeline_operators.data import pad_token_id  # noqa: E402
from forgeline_operators.finetune.megatron import _batches, engine, launch  # noqa: E402
from forgeline_operators.finetune.megatron.model import shape_from_hf  # noqa: E402
from forgeline_operators.finetune.spec import LoraSpec  # noqa: E402
from forgeline_operators.lib.hf_checkpoint import load_tokenizer  # noqa: E402
from forgeline_operators.lib.train_rows import sft_features  # noqa: E402

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[2] / "operators" / "forgeline_operators" / "models" / "tiny_llama"
DATA = Path(__file__).resolve().parents[2] / "workflows" / "data" / "chat_sft.jsonl"
MBS, GA, SEQ = 4, 4, 64
LORA = LoraSpec(r=8, alpha=16, dropout=0.0)


@pytest.fixture(scope="module")
def data() -> tuple[Any, int]:
    tok = load_tokenizer(TINY)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:64]]
    return sft_features(tok, rows, [], "sft", SEQ).train, pad_token_id(tok)


class _Saved:
    """Bytes of the storages autograd holds for backward, live and peak."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.now = self.peak = 0

    def pack(self, t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() in self.exclude or storage.nbytes() == 0:
            return t
        return _Box(self, t)

    @staticmethod
    def unpack(x: Any) -> Any:
        return x.t if isinstance(x, _Box) else x


class _Box:
    """What autograd keeps instead of the tensor: counts its storage until autograd drops it."""

    __slots__ = ("ptr", "saved", "t")

    def __init__(self, saved: _Saved, t: Any) -> None:
        self.saved, self.t = saved, t
        storage = t.untyped_storage()
        self.ptr = storage.data_ptr()
        entry = saved.live.get(self.ptr)
        if entry is None:
            saved.live[self.ptr] = [1, storage.nbytes()]
            saved.now += storage.nbytes()
            saved.peak = max(saved.peak, saved.now)
        else:
            entry[0] += 1

    def __del__(self) -> None:
        entry = self.saved.live[self.ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.saved.now -= entry[1]
            del self.saved.live[self.ptr]


def _measure(
    data: tuple[Any, int], tp: int, pp: int, lora: LoraSpec | None, recompute: bool = False
) -> list[dict[str, int]]:
    feats, pad = data
    shape = shape_from_hf(json.loads((TINY / "config.json").read_text()))

    def rank_fn(rank: int) -> dict[str, int]:
        settings = engine.Settings(
            tp=tp,
            pp=pp,
            lr=1e-3,
            total_steps=4,
            micro_batch_size=MBS,
            grad_accum=GA,
            lora=lora,
            recompute=recompute,
        )
        session = engine.setup(settings, TINY, shape)

        def batches(step: int) -> list[dict[str, Any]]:
            return _batches.micro_batches(
                feats,
                step,
                micro_batch_size=MBS,
                grad_accum=GA,
                dp=1,
                dp_rank=0,
                seed=0,
                length=SEQ,
                pad_id=pad,
            )

        engine.train_step(session, batches(0), SEQ)  # creates the Adam moments
        params = list(session.module.parameters())
        opt = 0
        for chained in getattr(session.optimizer, "chained_optimizers", [session.optimizer]):
            for state in chained.optimizer.state.values():
                opt += sum(
                    v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim()
                )
        saved = _Saved({p.untyped_storage().data_ptr() for p in params})
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            engine.train_step(session, batches(1), SEQ)
        return {
            "params": sum(p.numel() * p.element_size() for p in params),
            "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in session.model.buffers),
            "adam": opt,
            "activations": saved.peak,
            "left": saved.now,
        }

    return launch.run_world(tp * pp, tp, pp, rank_fn, timeout_s=240)


def _estimate(tp: int, pp: int, lora: LoraSpec | None, stage: str, recompute: bool = False) -> dict[str, int]:
    """The planner's parts for one pipeline stage (first or last) of this layout."""
    shape = shape_from_dir(TINY)
    assert shape is not None
    kw: dict[str, Any] = dict(
        precision="fp32",
        lora_r=lora.r if lora else None,
        lora_targets="all-linear",
        lora_for_dpo=False,
        double_quant=False,
        seq_len=SEQ,
        micro_batch=MBS,
        gradient_checkpointing=recompute,
    )
    method = "lora" if lora else "sft"
    return finetune_memory(shape, method, tp=tp, pp=pp, stage=stage, **kw).parts


@pytest.mark.parametrize(
    ("tp", "pp", "lora"),
    [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 1, LORA), (2, 1, LORA)],
    ids=["tp1", "tp2", "pp2", "tp2pp2", "lora-tp1", "lora-tp2"],
)
def test_estimate_matches_measured_rank_memory(data: Any, tp: int, pp: int, lora: LoraSpec | None) -> None:
    ranks = _measure(data, tp, pp, lora)
    for rank, got in enumerate(ranks):
        stage = "first" if rank // tp == 0 else "last"
        want = _estimate(tp, pp, lora, stage)
        assert got["left"] == 0, "saved tensors outlived the step"  # the counter is sound
        state = got["params"] + got["grads"] + got["adam"]
        if lora is None:
            assert state == want["weights + grads + adam"], (rank, got, want)
        else:
            assert state == pytest.approx(
                want["weights (frozen)"] + want["adapters + grads + adam"], rel=0.02
            )
        predicted = want["activations"] + want.get("logits", 0) // 2
        ratio = got["activations"] / predicted
        print(
            f"tp{tp} pp{pp} {'lora' if lora else 'sft'} rank {rank} ({stage}): state {state} "
            f"activations measured {got['activations']} estimate {predicted} ratio {ratio:.3f}"
        )
        assert 0.9 <= ratio <= 1.15, f"rank {rank} ({stage}): measured {got['activations']} vs {predicted}"


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2)], ids=["tp1", "tp2pp2"])
def test_recompute_estimate_matches_measured(data: Any, tp: int, pp: int) -> None:
    """Full recompute keeps each layer's input, plus one layer's activations while that layer is
    recomputed in backward; the saved logits are freed before any layer is recomputed, so a stage
    with the output layer peaks at inputs + max(one layer, logits), which the planner estimates."""
    plain = _measure(data, tp, pp, None)
    ranks = _measure(data, tp, pp, None, recompute=True)
    for rank, got in enumerate(ranks):
        stage = "first" if rank // tp == 0 else "last"
        want = _estimate(tp, pp, None, stage, recompute=True)
        h = shape_from_dir(TINY).hidden  # type: ignore[union-attr]
        in_flight = (2 // pp) * (pp if stage == "first" else 1)  # layer inputs kept (1F1B: pp on the first)
        one_layer = want["activations"] - 4 * SEQ * MBS * h * in_flight
        logits = _estimate(tp, pp, None, stage).get("logits", 0)  # fp32 logits + their gradient
        if logits:
            assert want["logits (beyond the recomputed layer)"] == max(0, logits - one_layer)
        # only the logits are saved for backward (their gradient lives in the backward pass): half
        predicted = want["activations"] + max(0, logits // 2 - one_layer)
        ratio = got["activations"] / predicted
        print(
            f"recompute tp{tp} pp{pp} rank {rank} ({stage}): "
            f"{got['activations']} vs {predicted} ({ratio:.3f})"
        )
        assert got["left"] == 0
        assert 0.9 <= ratio <= 1.15, f"rank {rank} ({stage}): measured {got['activations']} vs {predicted}"
        assert got["activations"] < 0.8 * plain[rank]["activations"]
