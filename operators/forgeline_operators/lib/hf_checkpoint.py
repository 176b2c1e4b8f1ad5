"""Loading a stage's Hugging Face checkpoint directory for training or scoring.

It owns what "a model directory" means to the stages that train or reshape a model (finetune hf and
megatron, prune, distill): a tokenizer whose missing pad token is EOS (padding is masked out, as in
:func:`forgeline_operators.data.pad_token_id`), and a causal LM that is either a full checkpoint or a
PEFT adapter directory merged into its base in memory (the base found through
``adapter_config.json``; a base that is gone is an :class:`OperatorError` naming the way out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forgeline.runtime.context import OperatorError

__all__ = ["adapter_base_dir", "load_causal_lm", "load_tokenizer"]


def load_tokenizer(model_dir: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:  # padding is masked out, so EOS serves (as in data.pad_token_id)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adapter_base_dir(model_dir: Path) -> Path | None:
    """For a PEFT adapter directory, the base model it was trained on; None for a full checkpoint."""
    config = model_dir / "adapter_config.json"
    if not config.is_file():
        return None
    base = Path(json.loads(config.read_text())["base_model_name_or_path"])
    if not (base / "config.json").is_file():
        raise OperatorError(
            f"{model_dir} is a LoRA adapter whose base model {base} is gone; "
            "start from the stage's merged output instead"
        )
    return base


def load_causal_lm(model_dir: Path, dtype: torch.dtype) -> Any:
    """A full causal LM from ``model_dir``, or from an adapter directory merged into its base in memory."""
    base = adapter_base_dir(model_dir)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype), model_dir
    )
    model = merged.merge_and_unload()
    model.config._name_or_path = str(model_dir)
    return model
