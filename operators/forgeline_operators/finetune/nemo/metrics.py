"""The NeMo trainers' metrics, read from their own console output into the stage's MLflow run.

The trainers run in their containers on a GPU cluster, usually out of reach of the tracking store (an
embedded SQLite file, say), but their output is always readable where the stage waits: the Ray job's
logs, or the pod's log through the Kubernetes API. This module turns that output into metrics under
the names the hf backend logs (``loss``, ``grad_norm``, ``learning_rate``, ``eval_loss``,
``rewards/accuracies``, ...), each at the trainer's own step:

* **Megatron-Bridge** v0.5.0 (SFT, LoRA): the per-``log_interval`` line built in
  ``src/megatron/bridge/training/utils/train_utils.py`` (``training_log``, lines 1172-1224:
  `` [date] iteration N/ M | consumed samples: ... | learning rate: ... | lm loss: ... | grad norm:
  ... |``, printed by the last rank) and the validation line of ``training/eval.py`` (line 440:
  `` validation loss at iteration N | lm loss value: ... | lm loss PPL: ... |``).
* **NeMo-RL** v0.7.0 (DPO): ``nemo_rl/algorithms/dpo.py`` prints a ``Step n/m`` banner per step
  (``Epoch e/E`` per epoch), then ``📊 Training Results:`` with one ``  • <DPOValMetrics field>: value``
  line per metric (lines 576-742); validation prints ``    • Validation <field>: value`` under
  ``📊 Validation Results for `...` set:`` (lines 503-507).

:class:`MetricTail` feeds lines to the trainer's parser and logs what it finds in batches, never the
same step twice (logs are re-read from an offset or a timestamp that may overlap), so a resumed stage
or a reconnected log stream continues where it was. Tested on lines written from those format strings;
the trainers themselves never ran here (no GPU, no containers).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["BridgeParser", "DpoParser", "MetricTail", "parser_for"]

Emit = tuple[int, dict[str, float]]

_BRIDGE_LINE = re.compile(r"\biteration\s+(\d+)/\s*(\d+)\s*\|(.*)$")
_BRIDGE_VALID = re.compile(r"validation loss at iteration (\d+)\s*\|(.*)$")
_BRIDGE_NAMES = {
    "lm loss": "loss",
    "grad norm": "grad_norm",
    "learning rate": "learning_rate",
    "elapsed time per iteration (ms)": "iteration_time_ms",
    "throughput per GPU (TFLOP/s/GPU)": "tflops_per_gpu",
    "loss scale": "loss_scale",
    "global batch size": "global_batch_size",
    "consumed samples": "consumed_samples",
    "number of skipped iterations": "skipped_iterations",
    "number of nan iterations": "nan_iterations",
}
_DPO_NAMES = {  # NeMo-RL DPOValMetrics field -> the hf backend's (trl's) name
    "loss": "loss",
    "sft_loss": "sft_loss",
    "preference_loss": "dpo_loss",
    "accuracy": "rewards/accuracies",
    "rewards_chosen_mean": "rewards/chosen",
    "rewards_rejected_mean": "rewards/rejected",
    "num_valid_samples": "num_valid_samples",
    "global_valid_seqs": "global_valid_seqs",
    "global_valid_toks": "global_valid_toks",
}


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class BridgeParser:
    """Megatron-Bridge's training and validation lines (stateless: every line carries its step)."""

    def feed(self, line: str) -> list[Emit]:
        m = _BRIDGE_VALID.search(line)
        if m:
            out: dict[str, float] = {}
            for part in m.group(2).split("|"):
                key, _, raw = part.partition(":")
                value = _number(raw)
                if value is None:
                    continue
                key = key.strip()
                if key.endswith(" value"):
                    out["eval_loss" if key == "lm loss value" else f"eval_{_slug(key[:-6])}"] = value
                elif key.endswith(" PPL"):
                    out["eval_perplexity" if key == "lm loss PPL" else f"eval_{_slug(key[:-4])}_ppl"] = value
            return [(int(m.group(1)), out)] if out else []
        m = _BRIDGE_LINE.search(line)
        if not m:
            return []
        out = {}
        for part in m.group(3).split("|"):
            key, _, raw = part.partition(":")
            value = _number(raw)
            if value is not None and key.strip():
                out[_BRIDGE_NAMES.get(key.strip(), _slug(key))] = value
        return [(int(m.group(1)), out)] if out else []


_DPO_EPOCH = re.compile(r"=+ Epoch (\d+)/(\d+) =+")
_DPO_STEP = re.compile(r"=+ Step (\d+)/(\d+) =+")
_DPO_BULLET = re.compile(r"•\s+(Validation )?([A-Za-z_]+):\s*(\S+)\s*$")


@dataclass
class DpoParser:
    """NeMo-RL's DPO output: the step banner sets the step, the results block that follows it holds
    the metrics (emitted when the block ends). The step is global: (epoch - 1) * steps per epoch + n."""

    epoch: int = 1
    step: int = 0
    _block: str | None = None  # "train" | "val" while inside a results block
    _pending: dict[str, float] = field(default_factory=dict)

    def feed(self, line: str) -> list[Emit]:
        m = _DPO_BULLET.search(line)
        if m and self._block is not None:
            value = _number(m.group(3))
            name = _DPO_NAMES.get(m.group(2))
            if value is not None and name is not None:
                self._pending[("eval_" if self._block == "val" else "") + name] = value
            return []
        out = self._flush() if line.strip() else []
        if "Training Results:" in line:
            self._block = "train"
        elif "Validation Results for" in line:
            self._block = "val"
        elif (e := _DPO_EPOCH.search(line)) is not None:
            self.epoch = int(e.group(1))
        elif (s := _DPO_STEP.search(line)) is not None:
            self.step = (self.epoch - 1) * int(s.group(2)) + int(s.group(1))
        return out

    def _flush(self) -> list[Emit]:
        if self._block is None:
            return []
        pending, self._pending, self._block = self._pending, {}, None
        if not pending or self.step == 0:
            return []
        prefix = "eval_" if "eval_loss" in pending else ""
        chosen, rejected = pending.get(f"{prefix}rewards/chosen"), pending.get(f"{prefix}rewards/rejected")
        if chosen is not None and rejected is not None:
            pending[f"{prefix}rewards/margins"] = chosen - rejected
        return [(self.step, pending)]

    def close(self) -> list[Emit]:
        return self._flush()


def parser_for(trainer: str) -> BridgeParser | DpoParser:
    """The parser of a rendered job's trainer (``megatron-bridge`` | ``nemo-rl``)."""
    return DpoParser() if trainer == "nemo-rl" else BridgeParser()


def _slug(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.strip().lower()).strip("_")


class MetricTail:
    """Lines in, metrics out: parses, keeps what is new, logs in batches through ``log(metrics, step)``.

    A (step, metric) pair is logged once: re-reading overlapping log text, or a trainer that resumed
    from a checkpoint and repeats a step, adds nothing. ``flush`` sends what is pending; ``feed``
    flushes on its own every ``flush_every_s``.
    """

    def __init__(
        self,
        trainer: str,
        log: Callable[[Mapping[str, float], int], None],
        flush_every_s: float = 5.0,
    ) -> None:
        self.parser = parser_for(trainer)
        self._log = log
        self._every = flush_every_s
        self._last_flush = time.monotonic()
        self._seen: dict[str, int] = {}  # metric -> highest step logged
        self._pending: dict[int, dict[str, float]] = {}
        self.logged = 0  # metric values sent, for the stage's summary

    def feed(self, lines: Iterable[str]) -> None:
        for line in lines:
            for step, metrics in self.parser.feed(line):
                self._add(step, metrics)
        if time.monotonic() - self._last_flush >= self._every:
            self.flush()

    def _add(self, step: int, metrics: Mapping[str, float]) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self._seen.get(k, 0)}
        if fresh:
            self._pending.setdefault(step, {}).update(fresh)

    def flush(self, final: bool = False) -> None:
        """Send what is pending; ``final``: the output has ended (closes an open DPO results block)."""
        if final and isinstance(self.parser, DpoParser):
            for step, metrics in self.parser.close():
                self._add(step, metrics)
        for step in sorted(self._pending):
            metrics = self._pending[step]
            self._log(metrics, step)
            self.logged += len(metrics)
            for k in metrics:
                self._seen[k] = max(self._seen.get(k, 0), step)
        self._pending.clear()
        self._last_flush = time.monotonic()
