"""Speculative decoding on the CPU engine: acceptance rate and speed-up of a draft model, greedy.

Draft: the shipped tiny model (2 layers). Target: a deeper model made from it here — the tiny model's
embeddings, layers, norm and head, plus ``--extra-layers`` copies of its layers whose output
projections (``o_proj``, ``down_proj``) are scaled by ``--perturb``, so each extra layer adds a small
residual update. The target is therefore several times the draft's compute and close to, but not the
same as, the draft: a stand-in for a real target/draft pair of one family, which this offline machine
does not have. Both are exported to OpenVINO IR at f32 with ``optimum-cli``.

The same ``ContinuousBatchingPipeline`` the Triton model runs decodes each prompt alone (batch 1, where
speculative decoding pays) with the target only, then with the draft proposing ``num_assistant_tokens``
per step (fastest of ``--repeats`` runs per prompt). Greedy tokens must be identical. Each engine
step of the speculative run yields the verified tokens of that step: accepted draft tokens = tokens
per step − 1, so the acceptance rate is Σ(tokens − 1) / Σ proposed. Speed-up = target-only time /
speculative time (1 thread), as wall time and as the process's CPU time (the steadier figure on a
shared machine).

    python bench/speculative.py [--extra-layers 14] [--perturb 0.05] [--tokens 64] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from forgeline_operators.engines.openvino import export_openvino
from forgeline_operators.models.tiny_llama import SOURCE

PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "def fibonacci(n):",
    "In the beginning the",
    "SELECT name FROM users WHERE",
    "The weather today is",
    "Machine learning is a field of",
    "She opened the door and",
]
F32 = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}


def make_target(draft_hf: Path, out: Path, extra_layers: int, perturb: float, seed: int = 0) -> Path:
    """The draft's weights plus ``extra_layers`` damped copies of its layers (see the module doc)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    draft = AutoModelForCausalLM.from_pretrained(draft_hf, dtype=torch.float32)
    config = draft.config
    n = config.num_hidden_layers
    config.num_hidden_layers = n + extra_layers
    target = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = draft.state_dict()
    new = target.state_dict()
    for key, value in new.items():
        if ".layers." not in key:
            value.copy_(state[key])
            continue
        layer = int(key.split(".layers.")[1].split(".")[0])
        source = key.replace(f".layers.{layer}.", f".layers.{layer % n}.")
        value.copy_(state[source])
        if layer >= n and (key.endswith("o_proj.weight") or key.endswith("down_proj.weight")):
            value.mul_(perturb * (1 + 0.5 * torch.randn(()).abs()))
    target.load_state_dict(new)
    target.save_pretrained(out)
    AutoTokenizer.from_pretrained(draft_hf).save_pretrained(out)
    return out


def _pipeline(target_ir: Path, draft_ir: Path | None) -> Any:
    import openvino_genai as ov_genai

    sched = ov_genai.SchedulerConfig()
    sched.num_kv_blocks = 256
    sched.max_num_batched_tokens = 256
    sched.dynamic_split_fuse = True
    props: dict[str, Any] = dict(F32)
    if draft_ir is not None:
        props["draft_model"] = ov_genai.draft_model(str(draft_ir), "CPU", **F32)
    return ov_genai.ContinuousBatchingPipeline(str(target_ir), sched, "CPU", props)


def decode(
    pipe: Any, prompt: str, tokens: int, num_assistant: int
) -> tuple[list[int], list[int], float, float]:
    """(generated ids, tokens per engine step, wall seconds, CPU seconds) for one request alone."""
    import openvino_genai as ov_genai

    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens = tokens
    cfg.ignore_eos = True  # same length for every prompt and both runs
    cfg.apply_chat_template = False
    if num_assistant:
        cfg.num_assistant_tokens = num_assistant
    ids = pipe.get_tokenizer().encode(prompt, add_special_tokens=True).input_ids
    started, cpu = time.perf_counter(), time.process_time()
    handle = pipe.add_request(0, ids, cfg)
    out: list[int] = []
    per_step: list[int] = []
    while pipe.has_non_finished_requests():
        pipe.step()
        got = 0
        if handle.can_read():
            for o in handle.read().values():
                out.extend(o.generated_ids)
                got += len(o.generated_ids)
        per_step.append(got)
    return out, per_step, time.perf_counter() - started, time.process_time() - cpu


def _best(pipe: Any, prompt: str, tokens: int, num_assistant: int, repeats: int) -> tuple[Any, ...]:
    """Ids and step counts of one run; the least wall and CPU time of ``repeats`` runs (the least
    disturbed by other work on shared cores)."""
    runs = [decode(pipe, prompt, tokens, num_assistant) for _ in range(repeats)]
    return runs[0][0], runs[0][1], min(r[2] for r in runs), min(r[3] for r in runs)


def measure(target_ir: Path, draft_ir: Path, tokens: int, num_assistant: int, repeats: int) -> dict[str, Any]:
    plain, spec = _pipeline(target_ir, None), _pipeline(target_ir, draft_ir)
    draft_only = _pipeline(draft_ir, None)
    decode(plain, "warm up", 4, 0)
    decode(spec, "warm up", 4, num_assistant)
    decode(draft_only, "warm up", 4, 0)
    t_plain = t_spec = t_draft = c_plain = c_spec = 0.0
    accepted = proposed = 0
    equal = True
    for prompt in PROMPTS:
        want, _, dt, ct = _best(plain, prompt, tokens, 0, repeats)
        t_plain, c_plain = t_plain + dt, c_plain + ct
        got, per_step, dt, ct = _best(spec, prompt, tokens, num_assistant, repeats)
        t_spec, c_spec = t_spec + dt, c_spec + ct
        equal &= got == want
        # The first step is the prefill (one token, nothing drafted yet); later steps verify drafts.
        decode_steps = [k for k in per_step[1:] if k > 0]
        accepted += sum(k - 1 for k in decode_steps)
        proposed += num_assistant * len(decode_steps)
        t_draft += _best(draft_only, prompt, tokens, 0, repeats)[2]
    generated = tokens * len(PROMPTS)
    return {
        "num_assistant_tokens": num_assistant,
        "greedy_equal": equal,
        "acceptance_rate": round(accepted / max(proposed, 1), 3),
        "tokens_per_target_step": round(generated / max(generated - accepted, 1), 2),
        "target_tok_s": round(generated / t_plain, 1),
        "speculative_tok_s": round(generated / t_spec, 1),
        "draft_alone_tok_s": round(generated / t_draft, 1),
        "speed_up": round(t_plain / t_spec, 2),
        "cpu_speed_up": round(c_plain / c_spec, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extra-layers", type=int, default=14)
    p.add_argument("--perturb", type=float, default=0.05)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--num-assistant-tokens", type=int, nargs="+", default=[3, 5])
    p.add_argument("--repeats", type=int, default=3, help="Runs per prompt; the fastest counts.")
    p.add_argument("--work", type=Path, default=None, help="Keep the exported models here (reused).")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="forgeline-spec-"))
    work.mkdir(parents=True, exist_ok=True)
    draft_hf, draft_ir = work / "draft-hf", work / "draft-ir"
    target_hf = work / f"target-hf-{a.extra_layers}-{a.perturb:g}"
    target_ir = work / f"target-ir-{a.extra_layers}-{a.perturb:g}"
    if not draft_ir.exists():
        SOURCE.materialize(draft_hf)
        export_openvino(draft_hf, draft_ir)
    if not target_ir.exists():
        make_target(draft_hf, target_hf, a.extra_layers, a.perturb)
        export_openvino(target_hf, target_ir)
    results = [measure(target_ir, draft_ir, a.tokens, n, a.repeats) for n in a.num_assistant_tokens]
    layers = 2 + a.extra_layers
    print(
        f"target: {layers} layers (draft 2, perturb {a.perturb:g}); "
        f"{len(PROMPTS)} prompts x {a.tokens} tokens"
    )
    for r in results:
        print(
            f"num_assistant_tokens={r['num_assistant_tokens']}: acceptance {r['acceptance_rate']:.1%}, "
            f"{r['tokens_per_target_step']} tokens/target step, target {r['target_tok_s']} tok/s, "
            f"speculative {r['speculative_tok_s']} tok/s -> speed-up {r['speed_up']}x wall, "
            f"{r['cpu_speed_up']}x CPU time "
            f"(draft alone {r['draft_alone_tok_s']} tok/s), greedy equal: {r['greedy_equal']}"
        )
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
