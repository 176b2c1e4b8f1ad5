"""megatron backend: real TP / PP / TP×PP / DP on CPU (gloo) give the per-step losses of TP=1.

The once-initialised weights are the shipped tiny Llama's HF checkpoint; every layout imports it
(sharded on load), trains 3 optimizer steps on the same global batches (8 rows, Adam, grad clipping
at 1.0 -- so a wrong grad norm shows up in the next step's loss) and reports loss and grad norm per
step. Tolerance: relative 1e-5 in float32 (measured differences are ~1e-7: reduction order only).
The negative control removes the data-parallel gradient all-reduce and must fail that check.
Each layout runs as forked ranks of one test process (``launch.run_world``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from forgeline.spec._models import LoraSpec  # noqa: E402
from forgeline_operators.data import pad_token_id  # noqa: E402
from forgeline_operators.finetune import sft  # noqa: E402
from forgeline_operators.finetune._train import load_tokenizer  # noqa: E402
from forgeline_operators.finetune.megatron import engine, launch, loop  # noqa: E402
from forgeline_operators.finetune.megatron.model import shape_from_hf  # noqa: E402

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[2] / "operators" / "forgeline_operators" / "models" / "tiny_llama"
DATA = Path(__file__).resolve().parents[2] / "workflows" / "data" / "chat_sft.jsonl"
RTOL = 1e-5
STEPS = 3
LORA = LoraSpec(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def data() -> tuple[Any, int]:
    tok = load_tokenizer(TINY)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:48]]
    return sft.features(tok, rows, [], "sft", 48).train, pad_token_id(tok)


def _run(
    data: tuple[Any, int], tp: int, pp: int, dp: int, *, lora: LoraSpec | None = None, **kw: Any
) -> loop.Run:
    feats, pad = data
    settings = engine.Settings(
        tp=tp, pp=pp, lr=1e-3, total_steps=6, micro_batch_size=4, grad_accum=2 // dp, lora=lora
    )
    shape = shape_from_hf(json.loads((TINY / "config.json").read_text()))
    return loop.Run(settings=settings, shape=shape, hf_dir=TINY, train=feats, pad_id=pad, steps=STEPS, **kw)


def _history(r: loop.Run, dp: int = 1, patch: Any = None) -> list[tuple[float, float]]:
    s = r.settings

    def rank_fn(rank: int) -> list[tuple[float, float]]:
        if patch is not None:
            patch()
        return [(h["loss"], h["grad_norm"]) for h in loop.run(r).history]

    return launch.run_world(s.tp * s.pp * dp, s.tp, s.pp, rank_fn, timeout_s=240)[0]


def _assert_same(got: list[tuple[float, float]], want: list[tuple[float, float]]) -> None:
    assert len(got) == len(want)
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, want, strict=True), 1):
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"loss differs at step {step}"
        assert norm == pytest.approx(ref_norm, rel=RTOL), f"grad norm differs at step {step}"


@pytest.fixture(scope="module")
def reference(data: tuple[Any, int]) -> list[tuple[float, float]]:
    ref = _history(_run(data, 1, 1, 1))
    assert ref[-1][0] < ref[0][0]  # it trains
    return ref


@pytest.mark.parametrize(("tp", "pp", "dp"), [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)])
def test_layout_matches_tp1(data: Any, reference: Any, tp: int, pp: int, dp: int) -> None:
    _assert_same(_history(_run(data, tp, pp, dp), dp=dp), reference)


def test_lora_tp2_matches_tp1(data: Any) -> None:
    one = _history(_run(data, 1, 1, 1, lora=LORA))
    two = _history(_run(data, 2, 1, 1, lora=LORA))
    assert one[0][1] > 0 and one[-1][0] < one[0][0]
    _assert_same(two, one)


def test_save_tp2pp2_resume_tp1_continues_exactly(data: Any, reference: Any, tmp_path: Path) -> None:
    first = _history(replace(_run(data, 2, 2, 1, checkpoint_root=tmp_path, save_every=2), steps=2))
    _assert_same(first, reference[:2])
    assert (tmp_path / "checkpoint-2" / "forgeline-complete.json").is_file()
    resumed = _history(_run(data, 1, 1, 1, resume_from=tmp_path / "checkpoint-2"))
    _assert_same(resumed, reference[2:])


def _drop_dp_grad_allreduce() -> None:
    from megatron.core.distributed import DistributedDataParallel

    DistributedDataParallel.finish_grad_sync = lambda self, *a, **k: None  # type: ignore[method-assign]


def test_negative_control_without_grad_allreduce_fails(data: Any, reference: Any) -> None:
    broken = _history(_run(data, 1, 1, 2), dp=2, patch=_drop_dp_grad_allreduce)
    assert broken[0][0] == pytest.approx(reference[0][0], rel=RTOL)  # same forward at step 1
    with pytest.raises(AssertionError, match="differs"):
        _assert_same(broken, reference)


PREFS = DATA.parent / "prefs.jsonl"


@pytest.fixture(scope="module")
def pairs() -> tuple[Any, int]:
    from forgeline_operators.finetune import dpo

    tok = load_tokenizer(TINY)
    rows = [json.loads(line) for line in PREFS.read_text().splitlines()[:32]]
    return dpo.features(tok, rows, [], 48).train, pad_token_id(tok)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_dpo_tp2_pp2_matches_tp1_and_starts_at_log2(pairs: Any, lora: LoraSpec | None) -> None:
    import math

    one = _history(replace(_run(pairs, 1, 1, 1, lora=lora), dpo_beta=0.1))
    both = _history(replace(_run(pairs, 2, 2, 1, lora=lora), dpo_beta=0.1))
    # policy == reference at step 1: every pair's margin is 0, the sigmoid loss is exactly log 2
    assert one[0][0] == pytest.approx(math.log(2), rel=1e-6)
    assert one[-1][0] < one[0][0]
    _assert_same(both, one)
