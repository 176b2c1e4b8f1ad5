"""Serving benchmark: one 64-request mixed-length workload, five ways, printed as tokens/s and p99 TTFT.

1. our endpoint (tritonserver + OpenVINO GenAI CB python model + OpenAI front), all requests at once;
2. the same OpenVINO GenAI ContinuousBatchingPipeline in-process (add_request/step/read);
3. transformers static batched ``generate()`` (batches of 16, left padding);
4. transformers continuous batching (``generate_batch``), when this transformers has it;
5. transformers one-by-one ``generate()``.
Every engine runs with 1 thread, greedy, fp32, output lengths forced (ignore EOS). Targets (issue 5):
endpoint ≥ 4x static batching; endpoint overhead vs in-process engine ≤ 1.15x.

    python bench/serving.py [--requests 64]
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

from forgeline_operators.deploy.endpoint import start_detached, stop_endpoint
from forgeline_operators.deploy.loadgen import LoadSpec, percentile, run_load, workload
from forgeline_operators.models.tiny_llama import SOURCE
from forgeline_operators.serve.export import export_openvino
from forgeline_operators.serve.repository import OpenvinoModelSpec, build_openvino_repository


def ov_inprocess(ir: Path, jobs: list[tuple[str, int]]) -> tuple[float, float, int]:
    import openvino_genai as ov_genai

    sched = ov_genai.SchedulerConfig()
    sched.max_num_seqs, sched.max_num_batched_tokens, sched.num_kv_blocks = 64, 1024, 512
    sched.enable_prefix_caching = True
    props = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    pipe = ov_genai.ContinuousBatchingPipeline(str(ir), sched, "CPU", props)
    tok = pipe.get_tokenizer()
    start = time.perf_counter()
    handles: list[Any] = []
    first: dict[int, float] = {}
    for i, (prompt, n) in enumerate(jobs):
        cfg = ov_genai.GenerationConfig()
        cfg.max_new_tokens, cfg.ignore_eos, cfg.apply_chat_template = n, True, False
        handles.append(pipe.add_request(i, tok.encode(prompt).input_ids, cfg))
    tokens = 0
    while pipe.has_non_finished_requests():
        pipe.step()
        now = time.perf_counter()
        for i, h in enumerate(handles):
            if h.can_read():
                for out in h.read().values():
                    tokens += len(out.generated_ids)
                    first.setdefault(i, now - start)
    return time.perf_counter() - start, percentile(list(first.values()), 99), tokens


def hf_runs(hf: Path, jobs: list[tuple[str, int]]) -> dict[str, tuple[float, float, int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(hf, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    results: dict[str, tuple[float, float, int]] = {}
    with torch.no_grad():
        start, ttft, tokens = time.perf_counter(), [], 0
        for i in range(0, len(jobs), 16):
            chunk = jobs[i : i + 16]
            enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True)
            n = max(k for _, k in chunk)  # a static batch runs to its longest member
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            ttft += [time.perf_counter() - start] * len(chunk)  # tokens come out when the batch ends
            tokens += sum(k for _, k in chunk)
        results["transformers static batch=16"] = (time.perf_counter() - start, percentile(ttft, 99), tokens)

        start, ttft, tokens = time.perf_counter(), [], 0
        for prompt, n in jobs:
            ids = tok(prompt, return_tensors="pt").input_ids
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            ttft.append(time.perf_counter() - start)
            tokens += n
        results["transformers one-by-one"] = (time.perf_counter() - start, percentile(ttft, 99), tokens)

        if hasattr(model, "generate_batch"):
            from transformers import GenerationConfig

            cfg = GenerationConfig(max_new_tokens=max(n for _, n in jobs), do_sample=False, eos_token_id=-1)
            inputs = [tok(p).input_ids for p, _ in jobs]
            start = time.perf_counter()
            try:
                out = model.generate_batch(inputs=inputs, generation_config=cfg)
                elapsed = time.perf_counter() - start
                tokens = sum(len(r.generated_tokens) for r in out.values())
                results["transformers continuous batching"] = (elapsed, float("nan"), tokens)
            except Exception as e:  # report, don't hide: the row shows why it is missing
                print(f"transformers generate_batch failed: {type(e).__name__}: {e}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    spec = LoadSpec(requests=args.requests, concurrency=args.requests, seed=0)
    jobs = workload(spec)
    rows: dict[str, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        SOURCE.materialize(hf)
        ir = export_openvino(hf, Path(tmp) / "ir")
        repo = build_openvino_repository(Path(tmp) / "repo", ir, OpenvinoModelSpec(name="llm"))
        home = Path(tmp) / "home"
        rec = start_detached(home, repo, "bench", served_name="llm")
        try:
            run_load(rec.url, LoadSpec(requests=8, concurrency=8, seed=99))  # warm-up
            report = run_load(rec.url, spec)
            assert not report.errors, report.errors
            rows["endpoint (triton + OpenAI front)"] = (
                report.duration_s,
                report.ttft_ms["p99"] / 1000,
                report.output_tokens,
            )
        finally:
            stop_endpoint(home, "bench")
        ov_inprocess(ir, jobs[:8])  # warm-up
        rows["OpenVINO GenAI CB in-process"] = ov_inprocess(ir, jobs)
        rows.update(hf_runs(hf, jobs))
    static = rows["transformers static batch=16"]
    print(f"{len(jobs)} requests, {sum(n for _, n in jobs)} output tokens, 1 thread per engine")
    print(f"{'system':38} {'tok/s':>9} {'p99 TTFT ms':>12} {'vs static':>10}")
    table = {}
    for name, (secs, ttft, tokens) in rows.items():
        tps = tokens / secs
        table[name] = {
            "tokens_per_s": round(tps, 1),
            "p99_ttft_ms": round(ttft * 1000, 1),
            "seconds": round(secs, 3),
        }
        print(f"{name:38} {tps:9.1f} {ttft * 1000:12.1f} {tps / (static[2] / static[0]):9.2f}x")
    ep, ip = rows["endpoint (triton + OpenAI front)"], rows["OpenVINO GenAI CB in-process"]
    overhead = (ep[0] / ep[2]) / (ip[0] / ip[2])
    print(f"endpoint overhead vs in-process engine: {overhead:.2f}x (target <= 1.15x)")
    if args.json:
        args.json.write_text(json.dumps({"rows": table, "endpoint_overhead": round(overhead, 3)}, indent=2))


if __name__ == "__main__":
    main()
