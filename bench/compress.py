"""Compression bench: size vs fp32 and bf16, perplexity delta vs the parent and time, per format.

Runs the real quantize operator (ModelOpt on CPU, NNCF on the OpenVINO IR) on the shipped tiny Llama
with the quickstart's corpus (calibration: first 64 rows; gate: the 36 held-out rows after them), so
the numbers are the ones a quantize stage logs. bf16 size = half the fp32 safetensors bytes.

    python bench/compress.py [--formats fp8,int8,int4_awq,nncf_int8,nncf_int4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_quantize_operator import context  # noqa: E402

from forgeline.runtime.context import MemorySink  # noqa: E402
from forgeline_operators.models.tiny_llama import SOURCE  # noqa: E402
from forgeline_operators.quantize import run  # noqa: E402

FORMATS = ["fp8", "int8_sq", "int8", "int4_awq", "w4a8_awq", "nncf_int8", "nncf_int4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'format':10} {'bytes':>9} {'x fp32':>7} {'x bf16':>7} {'ppl':>8} {'parent':>8} "
          f"{'delta':>7} {'agree':>6} {'seconds':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        SOURCE.materialize(model)
        for fmt in args.formats.split(","):
            work = Path(tmp) / fmt
            work.mkdir()
            started = time.time()
            calibration = {"dataset": "corpus", "samples": 64, "max_seq_len": 256}
            m = run(context(work, model, MemorySink(), format=fmt, calibration=calibration)).metrics
            seconds = time.time() - started
            ratio, size = m["size_bytes"] / m["parent_size_bytes"], int(m["size_bytes"])
            ppl, parent = m["perplexity"], m["parent_perplexity"]
            print(f"{fmt:10} {size:9d} {ratio:7.3f} {2 * ratio:7.3f} {ppl:8.3f} {parent:8.3f} "
                  f"{m['perplexity_increase']:+7.2%} {m['token_agreement']:6.3f} {seconds:8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
