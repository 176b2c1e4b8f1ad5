"""Fine-tuning throughput, MFU and memory: per method, dp=1 vs dp=2, peak RSS vs plan's estimate.

    PYTHONPATH=platform:operators python bench/finetune.py [--models tiny,small,smollm2] [--steps N]

Each case runs the real finetune operator (trl + peft + bitsandbytes; dp=2 over Ray Train on an
embedded 2-CPU Ray) in its own process, so its peak RSS is its own. ``tiny`` is the shipped
``builtin://tiny-llama`` (1.5M params); ``small`` is a ~30M-param Llama of the same family built here
with random weights (throughput only); ``smollm2`` is ``builtin://smollm2-135m-instruct`` (134.5M
params, resolved through the ModelStore as ``forgeline serve`` does, converted from its GGUF once and
cached under the temp dir). smollm2 defaults to 8 steps (tiny and small: 30) and to dp=1 only, to
keep a run to about 5 minutes on 2 cores (dp=2 adds Ray start-up and a second ~2 GB fp32 model + Adam
copy; it is untested here): ask for it with ``--dp 1,2``. Every case trains micro batch 8 (global:
dp x micro = 8) at seq len 64.

Printed per case: tokens/s (training steps only, rank 0's view of all workers' non-padding tokens),
achieved TFLOP/s, peak TFLOP/s, MFU, wall seconds, the plan's per-device memory estimate (model state
+ activations), the measured peak RSS of the training process and its growth over the process's
baseline after imports (python + torch + trl + Ray), which is what the estimate models.

MFU = model FLOPs per trained token x tokens/s / peak. N is the weight count of every matmul a
token goes through: all ``nn.Linear`` weights, the LM head included (tied or not: it is a
vocab x hidden matmul per token: 21 % of SmolLM2's N, 52 % of tiny's), the input embedding
(a gather) and norms excluded. Per token: full fine-tuning (sft) 6N (forward 2N, backward 4N: grads
of activations and of weights); LoRA and QLoRA 4N + 6A, A the adapter's parameters: the frozen base
costs forward 2N plus backward-through-activations 2N (no weight grads), the adapter is trained in
full; QLoRA's NF4 dequantization is overhead, not model FLOPs. DPO (LoRA here) adds the reference
model's forward (the adapter disabled), 2N: 6N + 6A. Attention scores (12·layers·hidden·seq, under
2 % at seq 64) and padding tokens are not counted, so MFU is useful work. The peak is measured in the
same process just before training: fp32 ``torch.matmul`` of 1024² and 2048² matrices (2n³ FLOPs),
best of 3, at the training's thread count (1); a dp=2 case's peak is 2x that (one thread per worker,
one core each).
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
MODELS = ("tiny", "small", "smollm2")
SMOLLM2 = "builtin://smollm2-135m-instruct"
# Per model: (default steps, default dp list).
DEFAULTS = {"tiny": (30, "1,2"), "small": (30, "1,2"), "smollm2": (8, "1")}


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
    # Passed as a dict: transformers' stubs declare LlamaConfig's fields, not its keyword arguments.
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(**fields)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


def builtin_model(uri: str) -> Path:
    """A builtin model resolved like ``forgeline serve`` does: materialized once by a ModelStore under
    the temp dir, reused while its fingerprint holds (the SmolLM2 GGUF conversion takes a while)."""
    from forgeline.artifacts import ModelStore
    from forgeline.registry import default_registry

    return ModelStore(Path(tempfile.gettempdir()) / "bench-forgeline", default_registry()).materialize(uri)


def _model_dir(model: str) -> Path:
    from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

    if model == "smollm2":
        return builtin_model(SMOLLM2)
    if model == "small":
        return _small_model(Path(tempfile.gettempdir()) / "bench-small-llama")
    return CHECKPOINT_DIR


def _matmul_weights(model_dir: Path) -> int:
    """N of the docstring: the weights of every nn.Linear, the LM head included (on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _flops_per_token(method: str, n: int, adapter: int) -> float:
    if method == "sft":
        return 6.0 * n
    if method == "dpo":  # the LoRA policy plus the reference's forward
        return 6.0 * n + 6.0 * adapter
    return 4.0 * n + 6.0 * adapter


def _matmul_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3) -> float:
    """Best fp32 matmul FLOP/s at torch's current thread count."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up: allocation, packing
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


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
    from forgeline_operators.finetune.spec import FinetuneStage

    if dp > 1:
        from forgeline.runtime._ray import RaySettings, ensure_ray

        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT / "operators")])
        ensure_ray(RaySettings(num_cpus=2))  # the embedded settings the driver uses
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    model_dir = _model_dir(model)
    matmul_weights = _matmul_weights(model_dir)
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
    assert isinstance(stage, FinetuneStage)
    t = stage.training
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
    peak_flops = dp * _matmul_peak()  # dp workers, one thread (one core) each
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
    adapter = 0 if method == "sft" else int(m["trainable_params"])
    achieved = _flops_per_token(method, matmul_weights, adapter) * m["tokens_per_second"]
    return {
        "model": model,
        "params": shape.parameters,
        "method": method,
        "dp": dp,
        "tokens_per_second": m["tokens_per_second"],
        "matmul_weights": matmul_weights,
        "adapter_params": adapter,
        "achieved_flops": achieved,
        "peak_flops": peak_flops,
        "mfu": achieved / peak_flops,
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
    parser.add_argument("--models", default="tiny", help=f"comma list of {','.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dp", help="comma list (default: 1,2; smollm2: 1)")
    parser.add_argument("--steps", type=int, help="training steps (default: 30; smollm2: 8)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # method,dp,model: run one case, print JSON
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)} (choose from {', '.join(MODELS)})")
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
        f"{'model':7} {'params':>7} {'method':6} {'dp':>2} {'tok/s':>8} {'TFLOP/s':>7} {'peak':>6} "
        f"{'MFU':>6} {'secs':>6} {'loss 1st':>8} {'last':>6} {'est MiB':>8} {'peak MiB':>8} {'growth':>8}"
    )
    print(header)
    for model in models:
        steps, dps = DEFAULTS[model]
        steps = args.steps or steps
        if model != "tiny":
            _model_dir(model)  # built or converted once, here, not inside a timed case
        for method in args.methods.split(","):
            for dp in (int(d) for d in (args.dp or dps).split(",")):
                cmd = [sys.executable, __file__, "--case", f"{method},{dp},{model}", "--steps", str(steps)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(f"{model:7} {method:6} dp={dp} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
                    continue
                r = json.loads(line.removeprefix("RESULT "))
                growth = (
                    None if r["baseline_rss_bytes"] is None else r["peak_rss_bytes"] - r["baseline_rss_bytes"]
                )
                print(
                    f"{model:7} {r['params'] / 1e6:6.1f}M {method:6} {dp:>2} {r['tokens_per_second']:8.0f} "
                    f"{r['achieved_flops'] / 1e12:7.4f} {r['peak_flops'] / 1e12:6.3f} {r['mfu']:6.1%} "
                    f"{r['seconds']:6.1f} {r['first_loss']:8.3f} {r['final_loss']:6.3f} "
                    f"{_mib(r['estimate_bytes'])} {_mib(r['peak_rss_bytes'])} {_mib(growth)}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
