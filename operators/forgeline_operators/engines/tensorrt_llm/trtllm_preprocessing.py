"""Triton python model ``preprocessing`` of the TensorRT-LLM ensemble: text → token ids for the engine.

Copied verbatim into the repository by :mod:`.repository`; runs in Triton's python stub, so it
imports nothing from Forgeline. Forgeline's own implementation of the tensor contract of
tensorrtllm_backend v0.19.0 ``all_models/inflight_batcher_llm/preprocessing`` (names, types, dims):
``QUERY`` → ``INPUT_ID`` (right-padded with the pad id) + ``REQUEST_INPUT_LEN``; ``STOP_WORDS_DICT`` /
``BAD_WORDS_DICT`` → ``[2, n]`` word lists (flat token ids; end offsets padded with -1);
``EMBEDDING_BIAS_WORDS`` + ``EMBEDDING_BIAS_WEIGHTS`` → a vocabulary-sized bias; end/pad ids from the
request or the tokenizer. Uses the HF ``tokenizers`` library on ``tokenizer.json`` (no transformers
import: the model loads in well under a second).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def _param(params: dict[str, Any], key: str, default: str) -> str:
    return params.get(key, {}).get("string_value") or default


def _strings(request: Any, name: str) -> list[list[str]] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    rows = tensor.as_numpy()
    return [[v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in row] for row in rows]


def _ints(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        params = json.loads(args["model_config"]).get("parameters", {})
        folder = Path(_param(params, "tokenizer_dir", "tokenizer"))
        if not folder.is_absolute():
            folder = Path(args["model_repository"]) / args["model_version"] / folder
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.add_special = _param(params, "add_special_tokens", "true") == "true"
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.end_id = self._token_id(config.get("eos_token"), 0)
        self.pad_id = self._token_id(config.get("pad_token"), self.end_id)
        self.vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token: Any, default: int) -> int:
        if isinstance(token, dict):
            token = token.get("content")
        found = self.tokenizer.token_to_id(token) if isinstance(token, str) else None
        return default if found is None else int(found)

    def _words(self, rows: list[list[str]] | None, batch: int) -> np.ndarray:
        """TRT-LLM word lists: per row ``[flat ids, end offsets]``, padded with 0 / -1 to one width."""
        lists = []
        for b in range(batch):
            ids: list[int] = []
            offsets: list[int] = []
            for word in rows[b] if rows else []:
                if word:
                    ids += self.tokenizer.encode(word, add_special_tokens=False).ids
                    offsets.append(len(ids))
            lists.append((ids, offsets))
        width = max(1, *(max(len(i), len(o)) for i, o in lists))
        out = np.zeros((batch, 2, width), dtype=np.int32)
        out[:, 1, :] = -1
        for b, (ids, offsets) in enumerate(lists):
            out[b, 0, : len(ids)] = ids
            out[b, 1, : len(offsets)] = offsets
        return out

    def _bias(self, request: Any, batch: int) -> np.ndarray:
        words = _strings(request, "EMBEDDING_BIAS_WORDS")
        weights = _ints(request, "EMBEDDING_BIAS_WEIGHTS")
        if not words or weights is None or not any(w for row in words for w in row):
            return np.empty((batch, 0), dtype=np.float32)
        bias = np.zeros((batch, self.vocab), dtype=np.float32)
        for b in range(batch):
            for word, weight in zip(words[b], weights[b], strict=False):
                for token in self.tokenizer.encode(word, add_special_tokens=False).ids:
                    bias[b, token] += float(weight)
        return bias

    def _id(self, request: Any, name: str, default: int, batch: int) -> np.ndarray:
        given = _ints(request, name)
        if given is not None and given.size:
            return given.reshape(batch, 1).astype(np.int32)
        return np.full((batch, 1), default, dtype=np.int32)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                queries = _strings(request, "QUERY") or []
                batch = len(queries)
                encoded = [
                    self.tokenizer.encode(q[0], add_special_tokens=self.add_special).ids for q in queries
                ]
                lengths = np.array([[len(e)] for e in encoded], dtype=np.int32)
                pad = self._id(request, "PAD_ID", self.pad_id, batch)
                ids = np.zeros((batch, max(1, int(lengths.max(initial=1)))), dtype=np.int32)
                for b, e in enumerate(encoded):
                    ids[b, :] = pad[b, 0]
                    ids[b, : len(e)] = e
                output_len = _ints(request, "REQUEST_OUTPUT_LEN")
                tensors = [
                    pb_utils.Tensor("INPUT_ID", ids),
                    pb_utils.Tensor("REQUEST_INPUT_LEN", lengths),
                    pb_utils.Tensor("BAD_WORDS_IDS", self._words(_strings(request, "BAD_WORDS_DICT"), batch)),
                    pb_utils.Tensor(
                        "STOP_WORDS_IDS", self._words(_strings(request, "STOP_WORDS_DICT"), batch)
                    ),
                    pb_utils.Tensor("EMBEDDING_BIAS", self._bias(request, batch)),
                    pb_utils.Tensor("REQUEST_OUTPUT_LEN", np.asarray(output_len, dtype=np.int32)),
                    pb_utils.Tensor("OUT_END_ID", self._id(request, "END_ID", self.end_id, batch)),
                    pb_utils.Tensor("OUT_PAD_ID", pad),
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as e:  # one bad request fails alone
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
