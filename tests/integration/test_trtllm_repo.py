"""The TensorRT-LLM inflight_batcher_llm repository, loaded by the real tritonserver 2.51.

There is no TensorRT-LLM backend here, so the ``tensorrt_llm`` step is a python model with the very
config Forgeline renders for the real backend (same tensors, dims, batching, decoupled policy) that
echoes the prompt's tokens back as its "generation". Everything else is what a GPU deployment runs:
the ensemble's wiring, and the pre/post-processing models with the real tokenizer. A request through
the ensemble must come back as the prompt's text — tokenized, shaped for the engine, detokenized —
non-streamed and streamed token by token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from forgeline_operators.deploy.triton import TritonServer
from forgeline_operators.engines.tensorrt_llm.repository import (
    TrtllmRepositorySpec,
    build_llmapi_repository,
    build_trtllm_repository,
)
from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR, SOURCE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ECHO_ENGINE = '''
"""Stand-in for the tensorrtllm backend: echoes input_ids as generated tokens (decoupled)."""
import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _get(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return default if t is None else t.as_numpy().reshape(-1)[0]


def _response(ids):
    n = len(ids)
    f32 = np.float32
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int32).reshape(1, 1, n)),
        pb_utils.Tensor("sequence_length", np.array([[n]], dtype=np.int32)),
        pb_utils.Tensor("cum_log_probs", np.zeros((1, 1), f32)),
        pb_utils.Tensor("output_log_probs", np.zeros((1, 1, n), f32)),
        pb_utils.Tensor("context_logits", np.zeros((1, 1, 1), f32)),
        pb_utils.Tensor("generation_logits", np.zeros((1, 1, 1, 1), f32)),
        pb_utils.Tensor("batch_index", np.zeros((1, 1), np.int32)),
        pb_utils.Tensor("sequence_index", np.zeros((1, 1), np.int32)),
    ])


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()[0]
            length = int(_get(request, "input_lengths", len(ids)))
            prompt = ids[:length].tolist()
            out = prompt[: int(_get(request, "request_output_len", length))]
            if not bool(_get(request, "exclude_input_in_output", False)):
                out = prompt + out
            if bool(_get(request, "streaming", False)):
                for token in out:
                    sender.send(_response([token]))
                sender.send(flags=FINAL)
            else:
                sender.send(_response(out), flags=FINAL)
        return None
'''

PROMPT = "Once upon a time there was a tiny model"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("trtllm")
    SOURCE.materialize(root / "tiny")
    echo = root / "echo.py"
    echo.write_text(ECHO_ENGINE)
    spec = TrtllmRepositorySpec(engine_dir="/engines/tiny", max_batch_size=8, lora=True)
    repo = build_trtllm_repository(root / "repo", spec, root / "tiny", engine_model_py=echo)
    with TritonServer(repo, ["ensemble"], log_path=root / "triton.log") as srv:
        yield srv


def test_ensemble_round_trips_text_through_tokenizer_and_engine(server: TritonServer) -> None:
    from tokenizers import Tokenizer

    index = httpx.post(f"{server.url}/v2/repository/index", json={}).json()
    ready = {m["name"] for m in index if m.get("state") == "READY"}
    assert ready == {"ensemble", "preprocessing", "tensorrt_llm", "postprocessing"}
    body = {
        "text_input": PROMPT,
        "max_tokens": 64,
        "exclude_input_in_output": True,
        "stop_words": ["dragon"],
        "bad_words": [""],
        "temperature": 0.0,
    }
    r = httpx.post(f"{server.url}/v2/models/ensemble/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    tok = Tokenizer.from_file(str(CHECKPOINT_DIR / "tokenizer.json"))
    want = tok.decode(tok.encode(PROMPT).ids, skip_special_tokens=True)
    assert r.json()["text_output"] == want

    chunks = []
    with httpx.stream(
        "POST", f"{server.url}/v2/models/ensemble/generate_stream", json={**body, "stream": True}, timeout=60
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                chunks.append(event["text_output"])
    assert len(chunks) == len(tok.encode(PROMPT).ids)  # one response per engine token
    assert "".join(chunks).replace(" ", "") == want.replace(" ", "")


LLMAPI_STAND_IN = '''
"""Stand-in for NVIDIA's llmapi model.py: answers text_input reversed (decoupled)."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            out = text.decode()[::-1].encode()
            tensors = [
                pb_utils.Tensor("text_output", np.array([out], dtype=np.object_)),
                pb_utils.Tensor("finish_reason", np.array([b"stop"], dtype=np.object_)),
                pb_utils.Tensor("stop_reason", np.array([b""], dtype=np.object_)),
                pb_utils.Tensor("cumulative_logprob", np.zeros(1, np.float32)),
            ]
            request.get_response_sender().send(
                pb_utils.InferenceResponse(output_tensors=tensors),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        return None
'''


def test_llmapi_config_loads(tmp_path: Path) -> None:
    """The llmapi layout's config.pbtxt is accepted by the real server (model.py: a stand-in)."""
    spec = TrtllmRepositorySpec(engine_dir="unused")
    repo = build_llmapi_repository(tmp_path / "repo", spec, "/models/hf", {"tensor_parallel_size": 1})
    (repo / "tensorrt_llm" / "1" / "model.py").write_text(LLMAPI_STAND_IN)
    with TritonServer(repo, ["tensorrt_llm"], log_path=tmp_path / "triton.log") as srv:
        body = {"text_input": "abc", "sampling_param_max_tokens": 4, "streaming": False}
        r = httpx.post(f"{srv.url}/v2/models/tensorrt_llm/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["text_output"] == "cba" and r.json()["finish_reason"] == "stop"
