"""``builtin://tiny-llama``: the pre-trained 1.5M-parameter Llama shipped with Forgeline.

Owns the :class:`~forgeline.registry.ModelSource` of the checkpoint in ``tiny_llama/`` (byte-level
BPE tokenizer with a chat template, fp32 safetensors weights), built by
``scripts/make_tiny_llama.py`` from the corpus in ``corpus/``. It stands in for a real base model in
every stage that runs on CPU: small enough to fine-tune in seconds, pre-trained enough that
perplexity, quantization and LoRA results mean something. Importing this module reads only the
safetensors header (for the exact parameter count); no torch, no transformers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

from forgeline.registry import ModelSource

__all__ = ["CHECKPOINT_DIR", "SOURCE", "directory_fingerprint", "fingerprint", "materialize"]

CHECKPOINT_DIR = Path(__file__).with_name("tiny_llama")
_WEIGHTS = "model.safetensors"


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def directory_fingerprint(directory: Path) -> str:
    """sha256 over the (name, bytes) of every file in ``directory``, in name order."""
    digest = hashlib.sha256()
    for path in _files(directory):
        name = path.name.encode()
        data = path.read_bytes()
        # Length prefixes keep ("ab", "c") and ("a", "bc") from hashing alike.
        digest.update(struct.pack("<QQ", len(name), len(data)))
        digest.update(name)
        digest.update(data)
    return digest.hexdigest()


def fingerprint() -> str:
    """Fingerprint of exactly what :func:`materialize` writes."""
    return directory_fingerprint(CHECKPOINT_DIR)


def materialize(dest: Path) -> None:
    """Copy the shipped HF checkpoint into ``dest`` (created if missing); loadable offline."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in _files(CHECKPOINT_DIR):
        shutil.copyfile(path, dest / path.name)


def _parameter_count(weights: Path) -> int:
    # safetensors starts with a u64 header length and a JSON header of tensor shapes: the exact count
    # without loading a tensor.
    with weights.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    count = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for dim in entry["shape"]:
            n *= dim
        count += n
    return count


SOURCE = ModelSource(
    name="tiny-llama",
    fingerprint=fingerprint,
    materialize=materialize,
    parameters=_parameter_count(CHECKPOINT_DIR / _WEIGHTS),
    description=(
        "Llama architecture, 2 layers, hidden 128, 4 heads (2 KV), vocab 4096, untied head; "
        "pre-trained on Python stdlib docstrings and templated English; fp32, ~6 MB."
    ),
)
