"""GGUF import: a ``.gguf`` file (llama.cpp's format) into a verified Hugging Face checkpoint.

transformers loads a GGUF (``from_pretrained(dir, gguf_file=...)``, dequantized to fp32), but its
``save_pretrained`` of the tokenizer is wrong for byte-level BPE vocabularies (SmolLM2, Llama 3, Qwen):
it writes ``CodeLlamaTokenizer`` with a SentencePiece-style decoder, so the reloaded tokenizer puts
token 0 between words (FACTS.md: perplexity 20 → 88,364 with bit-identical weights) and
openvino-tokenizers cannot convert its detokenizer. This module owns the import that does not have
that trap: weights and config through transformers; the tokenizer written from the GGUF's own
metadata (vocabulary, merges, special tokens, chat template; byte-level decoder for ``gpt2`` models);
a generation config with the GGUF's end-of-sequence token. Then it **verifies** the directory it
wrote: the reloaded tokenizer's ids equal a reference tokenizer built independently from the GGUF
fields on probe texts (multi-byte characters included) and decode back to the text, and the
reloaded model's perplexity on a fixed paragraph is within 2 % of the GGUF-loaded model's. A mismatch
is a :class:`GgufImportError` naming what differs; nothing half-verified is published.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forgeline.registry import ModelFormat

__all__ = [
    "FORMAT",
    "IMPORTER_VERSION",
    "PARAGRAPH",
    "PROBES",
    "GgufImportError",
    "ImportReport",
    "file_sha256",
    "import_gguf",
    "metadata",
]

IMPORTER_VERSION = "1"
REPORT_NAME = "forgeline-gguf-import.json"
# Texts whose token ids must match: ASCII, spacing, digits, accents, CJK, an emoji, special tokens.
PROBES = (
    "The capital of France is Paris.",
    "  two  spaces\nnew line\ttab, digits 2026 and 3.14159",
    "naïve café — déjà vu, 東京 and 🙂 emoji",
    "<|im_start|>user\nHi there<|im_end|>\n",
)
PARAGRAPH = (
    "The river rises in the hills to the north and flows slowly through farmland before it reaches "
    "the town. In spring the water is high and brown with soil; by late summer it is clear and shallow "
    "enough for children to wade across. People have fished here for centuries, and the old stone "
    "bridge near the market still carries most of the traffic between the two halves of the town."
)
PERPLEXITY_TOLERANCE = 0.02


class GgufImportError(RuntimeError):
    """The imported checkpoint does not reproduce the GGUF model; the message says what differs."""


@dataclass(frozen=True)
class ImportReport:
    gguf: str
    gguf_sha256: str
    architecture: str
    tokenizer_model: str
    parameters: int
    probes_equal: int
    perplexity_gguf: float
    perplexity_imported: float
    importer_version: str = IMPORTER_VERSION


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def metadata(path: Path) -> dict[str, Any]:
    """The GGUF's key-value metadata (token arrays included), read without loading tensors."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a type gguf cannot render: not one the import needs
            continue
    out["_parameters"] = int(sum(int(math.prod(int(d) for d in t.shape)) for t in reader.tensors))
    return out


def _reference_tokenizer(meta: dict[str, Any]) -> Any:
    """The GGUF's tokenizer built straight from its fields with `tokenizers` (no transformers)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None else None)
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    # GGUF token types: 3 = control (special), 4 = user-defined (added, not special).
    tok.add_special_tokens([AddedToken(tokens[i], special=True) for i, t in enumerate(types) if t == 3])
    tok.add_tokens([AddedToken(tokens[i], special=False) for i, t in enumerate(types) if t == 4])
    return tok


def _write_tokenizer(gguf_dir: Path, gguf_name: str, meta: dict[str, Any], dest: Path) -> None:
    from tokenizers import decoders
    from transformers import AutoTokenizer

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None else None

    loaded = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    backend = loaded.backend_tokenizer
    template = meta.get("tokenizer.chat_template")
    if meta.get("tokenizer.ggml.model") == "gpt2":
        # Byte-level BPE: the decoder is byte-level, and nothing is prepended unless the GGUF says so.
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = None
        backend.save(str(dest / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": special("bos"),
            "eos_token": special("eos"),
            "pad_token": special("padding") or special("eos"),
            "unk_token": special("unknown"),
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": int(meta.get(f"{meta['general.architecture']}.context_length", 2048)),
        }
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if template:
            (dest / "chat_template.jinja").write_text(str(template))
    else:  # SentencePiece vocabularies: transformers' own conversion, checked below like any other
        if template:
            loaded.chat_template = str(template)
        loaded.save_pretrained(dest)


def _perplexity(model: Any, ids: list[int]) -> float:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
    return float(torch.exp(out.loss))


def import_gguf(path: Path, dest: Path) -> ImportReport:
    """Write a verified HF checkpoint of the GGUF ``path`` into ``dest`` (created); return the report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = path.resolve()
    meta = metadata(path)
    arch = str(meta.get("general.architecture", "?"))
    dest.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.save_pretrained(dest)
    _write_tokenizer(path.parent, path.name, meta, dest)
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    GenerationConfig(
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", eos),
    ).save_pretrained(dest)

    # ---- verification of what was written, against the GGUF
    saved = AutoTokenizer.from_pretrained(dest)
    if meta.get("tokenizer.ggml.model") == "gpt2":
        ref = _reference_tokenizer(meta)

        def ref_ids(text: str) -> list[int]:
            return list(ref.encode(text, add_special_tokens=False).ids)
    else:
        gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

        def ref_ids(text: str) -> list[int]:
            return list(gguf_tok(text, add_special_tokens=False).input_ids)

    problems = []
    for text in PROBES:
        want, got = ref_ids(text), list(saved(text, add_special_tokens=False).input_ids)
        if want != got:
            first = next(
                (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                min(len(want), len(got)),
            )
            problems.append(
                f"token ids of {text!r} differ from the GGUF tokenizer's at position {first}: "
                f"GGUF {want[first : first + 4]} vs imported {got[first : first + 4]}"
            )
        elif "<|" not in text and saved.decode(got) != text:
            problems.append(f"{text!r} decodes back as {saved.decode(got)!r}")
    if saved.eos_token is not None and eos is not None and saved.eos_token != tokens[int(eos)]:
        problems.append(f"eos token {saved.eos_token!r}, the GGUF says {tokens[int(eos)]!r}")
    if problems:
        raise GgufImportError(
            f"{path.name}: the imported tokenizer does not match the GGUF: " + "; ".join(problems)
        )

    ppl_gguf = _perplexity(model, ref_ids(PARAGRAPH))
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    ppl_imported = _perplexity(reloaded, list(saved(PARAGRAPH, add_special_tokens=False).input_ids))
    if not abs(ppl_imported - ppl_gguf) <= PERPLEXITY_TOLERANCE * ppl_gguf:
        raise GgufImportError(
            f"{path.name}: perplexity on the check paragraph is {ppl_imported:.2f} imported vs "
            f"{ppl_gguf:.2f} loaded from the GGUF (more than {PERPLEXITY_TOLERANCE:.0%} apart)"
        )
    report = ImportReport(
        gguf=path.name,
        gguf_sha256=file_sha256(path),
        architecture=arch,
        tokenizer_model=str(meta.get("tokenizer.ggml.model")),
        parameters=sum(p.numel() for p in reloaded.parameters()),
        probes_equal=len(PROBES),
        perplexity_gguf=round(ppl_gguf, 4),
        perplexity_imported=round(ppl_imported, 4),
    )
    (dest / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _convert(path: Path, dest: Path) -> None:
    import_gguf(path, dest)


FORMAT = ModelFormat(name="gguf", suffixes=(".gguf",), version=IMPORTER_VERSION, convert=_convert)
