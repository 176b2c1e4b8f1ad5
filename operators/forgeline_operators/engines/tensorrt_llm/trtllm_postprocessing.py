"""Triton python model ``postprocessing`` of the TensorRT-LLM ensemble: engine token ids → text.

Copied verbatim into the repository by :mod:`.repository`; runs in Triton's python stub.
Forgeline's own implementation of the tensor contract of tensorrtllm_backend v0.19.0
``all_models/inflight_batcher_llm/postprocessing``: ``TOKENS_BATCH`` ``[batch, beam, tokens]`` and
``SEQUENCE_LENGTH`` ``[batch, beam]`` → ``OUTPUT`` ``[batch, beam]`` strings, each beam decoded up to
its length. In a streamed ensemble it runs once per engine response (the new tokens only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        params = json.loads(args["model_config"]).get("parameters", {})
        folder = Path(params.get("tokenizer_dir", {}).get("string_value") or "tokenizer")
        if not folder.is_absolute():
            folder = Path(args["model_repository"]) / args["model_version"] / folder
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.skip_special = params.get("skip_special_tokens", {}).get("string_value", "true") == "true"

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
                lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
                texts = np.empty(lengths.shape, dtype=np.object_)
                for b in range(tokens.shape[0]):
                    for k in range(tokens.shape[1]):
                        ids = tokens[b, k, : int(lengths[b, k])].tolist()
                        text = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)
                        texts[b, k] = text.encode("utf-8")
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", texts)])
                )
            except Exception as e:  # one bad request fails alone
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
