"""GPU smoke test of the nemo backend: the rendered Megatron-Bridge LoRA job runs in the real NeMo
Framework image on a local GPU and exports a PEFT adapter.

Needs a CUDA GPU (the ``gpu`` marker skips without one), ``docker`` or ``podman`` with GPU access,
the pinned image already pulled (``nvcr.io/nvidia/nemo:26.06``; it is not pulled here) and a local
Llama 3.2 1B HF checkpoint in ``FORGELINE_NEMO_SMOKE_MODEL`` (the recipe is ``llama32_1b_peft_config``).
Each missing piece is a clean skip naming it. It has never run on the machines this was written on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from forgeline.spec import Workflow
from forgeline_operators.finetune.nemo import render

DATA = Path(__file__).resolve().parents[2] / "workflows" / "data" / "chat_sft.jsonl"


def _runtime() -> str | None:
    for tool in ("docker", "podman"):
        if shutil.which(tool):
            return tool
    return None


@pytest.mark.gpu
def test_lora_job_runs_in_the_nemo_image_and_exports_an_adapter(tmp_path: Path) -> None:
    tool = _runtime()
    model = os.environ.get("FORGELINE_NEMO_SMOKE_MODEL")
    if tool is None:
        pytest.skip("needs docker or podman")
    if not model or not (Path(model) / "config.json").is_file():
        pytest.skip("set FORGELINE_NEMO_SMOKE_MODEL to a local Llama-3.2-1B HF checkpoint")
    inspect = subprocess.run(
        [tool, "image", "inspect", render.BRIDGE_IMAGE], capture_output=True, check=False
    )
    if inspect.returncode != 0:
        pytest.skip(f"pull {render.BRIDGE_IMAGE} first")
    wf = Workflow.model_validate(
        {"name": "smoke", "model": {"base": model}, "data": {"d": {"path": str(DATA), "format": "sft"}},
         "stages": [{"name": "tune", "kind": "finetune", "method": "lora", "backend": "nemo", "dataset": "d",
                     "merge": False,
                     "training": {"precision": "bf16", "max_steps": 5, "micro_batch_size": 1,
                                  "max_seq_len": 256},
                     "nemo": {"recipe": "llama32_1b_peft_config", "gpus_per_node": 1}}]}
    )  # fmt: skip
    shared = tmp_path / "shared"
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "training.jsonl").write_text(
        "".join(json.dumps({"input": r["prompt"], "output": r["completion"]}) + "\n" for r in rows)
    )
    job = render.JobInputs(
        name="smoke", model="/model", shared_dir=str(shared), train_rows=len(rows), eval_rows=0
    )
    r = render.render(wf.stages[0], job)
    (shared / "job").mkdir()
    for name, text in r.files.items():
        (shared / "job" / name).write_text(text)
    done = subprocess.run(
        [tool, "run", "--rm", "--gpus", "all", "--ipc=host", "-v", f"{model}:/model:ro",
         "-v", f"{shared}:{shared}", r.image, *r.entrypoint],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    adapter = Path(r.outputs["adapter"])
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
