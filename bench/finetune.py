"""Fine-tuning throughput and memory: tokens/s per method, dp=1 vs dp=2, peak RSS vs plan's estimate.

    PYTHONPATH=platform:operators python bench/finetune.py [--models tiny,small] [--steps 30]

Each case runs the real finetune operator (trl + peft + bitsandbytes; dp=2 over Ray Train on an
embedded 2-CPU Ray) in its own process, so its peak RSS is its own. ``tiny`` is the shipped
``builtin://tiny-llama`` (1.5M params); ``small`` is a ~30M-param Llama of the same family built here
with random weights (throughput only). Printed per case: tokens/s (training steps only, rank 0's view
of all workers' tokens), wall seconds, the plan's per-device memory estimate (model state +
activations), the measured peak RSS of the training process and its growth over the process's
baseline after imports (python + torch + trl + Ray), which is what the estimate models.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "workflows" / "data"
METHODS = ["sft", "lora", "qlora", "dpo"]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _small_model(dest: Path) -> Path:
    """A ~30M-parameter Llama with the tiny model's tokenizer (random weights: for speed, not quality)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

    if (dest / "config.json").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(str(CHECKPOINT_DIR))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


def _stage(method: str, dp: int, steps: int) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "name": "bench",
        "kind": "finetune",
        "method": method,
        "dataset": "prefs" if method == "dpo" else "sft",
        "training": {
            "max_steps": steps,
            "micro_batch_size": 8 // dp,  # the same global batch for dp=1 and dp=2
            "max_seq_len": 64,
            "lr": 1e-3,
            "eval_fraction": 0.0,
            "checkpoint_every_steps": steps,
        },
        "parallelism": {"dp": dp},
    }
    if method in ("lora", "qlora", "dpo"):
        stage["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    return stage


def _case(method: str, dp: int, model: str, steps: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    torch.set_num_threads(1)
    # Imported before the baseline, so library code counts as process overhead, not training memory.
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from trl import DPOTrainer, SFTTrainer  # noqa: F401

    from forgeline.artifacts import sha256_file
    from forgeline.plan._estimates import finetune_memory, shape_from_dir
    from forgeline.runtime.context import DatasetInput, MemorySink, StageContext
    from forgeline.spec import Workflow
    from forgeline_operators.finetune import _train, dpo, sft  # noqa: F401
    from forgeline_operators.finetune.operator import run
    from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

    if dp > 1:
        from forgeline.runtime._ray import RaySettings, ensure_ray

        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT / "operators")])
        ensure_ray(RaySettings(num_cpus=2))  # the embedded settings the driver uses
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    model_dir = (
        CHECKPOINT_DIR if model == "tiny" else _small_model(Path(tempfile.gettempdir()) / "bench-small-llama")
    )
    body = _stage(method, dp, steps)
    data = {"sft": (DATA / "chat_sft.jsonl", "sft"), "prefs": (DATA / "prefs.jsonl", "preference")}
    wf = Workflow.model_validate(
        {
            "name": "bench",
            "model": {"base": str(model_dir)},
            "data": {n: {"path": str(p), "format": f} for n, (p, f) in data.items()},
            "stages": [body],
        }
    )
    stage = wf.stages[0]
    (work / "out").mkdir()
    (work / "work").mkdir()
    ctx = StageContext(
        stage=stage,
        workflow=wf,
        output_dir=work / "out",
        work_dir=work / "work",
        sink=MemorySink(),
        resolve=lambda ref: model_dir,
        values=lambda ref: None,
        datasets={n: DatasetInput(n, p, f, sha256_file(p)) for n, (p, f) in data.items()},
        threads=1,
    )
    shape = shape_from_dir(model_dir)
    assert shape is not None
    t = stage.training  # type: ignore[attr-defined]
    estimate = finetune_memory(
        shape,
        method,
        precision="fp32",
        lora_r=8 if method != "sft" else None,
        lora_targets="all-linear",
        lora_for_dpo=True,
        double_quant=True,
        seq_len=t.max_seq_len,
        micro_batch=t.micro_batch_size,
        gradient_checkpointing=False,
        tp=1,
        pp=1,
    )
    baseline = _rss_bytes()
    started = time.perf_counter()
    try:
        result = run(ctx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    m = result.metrics
    # dp=1 trains in this process; dp=2 reports rank 0's own peak (a Ray worker started from scratch).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if dp == 1 else m["peak_rss_bytes"]
    return {
        "model": model,
        "params": shape.parameters,
        "method": method,
        "dp": dp,
        "tokens_per_second": m["tokens_per_second"],
        "seconds": seconds,
        "first_loss": m["first_loss"],
        "final_loss": m["final_loss"],
        "estimate_bytes": estimate.per_device_bytes,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline if dp == 1 else None,
    }


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:8.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny", help="comma list of tiny,small")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dp", default="1,2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # method,dp,model: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        method, dp, model = args.case.split(",")
        print("RESULT " + json.dumps(_case(method, int(dp), model, args.steps)), flush=True)
        return 0
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT / "operators")]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    header = (
        f"{'model':6} {'params':>7} {'method':6} {'dp':>2} {'tok/s':>8} {'secs':>6} {'loss 1st':>8} "
        f"{'last':>6} {'est MiB':>8} {'peak MiB':>8} {'growth':>8}"
    )
    print(header)
    for model in args.models.split(","):
        for method in args.methods.split(","):
            for dp in (int(d) for d in args.dp.split(",")):
                cmd = [
                    sys.executable,
                    __file__,
                    "--case",
                    f"{method},{dp},{model}",
                    "--steps",
                    str(args.steps),
                ]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(f"{model:6} {method:6} dp={dp} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
                    continue
                r = json.loads(line.removeprefix("RESULT "))
                growth = (
                    None if r["baseline_rss_bytes"] is None else r["peak_rss_bytes"] - r["baseline_rss_bytes"]
                )
                print(
                    f"{model:6} {r['params'] / 1e6:6.1f}M {method:6} {dp:>2} {r['tokens_per_second']:8.0f} "
                    f"{r['seconds']:6.1f} {r['first_loss']:8.3f} {r['final_loss']:6.3f} "
                    f"{_mib(r['estimate_bytes'])} {_mib(r['peak_rss_bytes'])} {_mib(growth)}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
