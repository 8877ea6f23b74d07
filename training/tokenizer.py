"""A word-level CLIP BPE tokenizer for the synthetic-scene world: every caption word is one token.

It is an ordinary CLIPTokenizer folder (vocab.json + merges.txt): the bundled character vocabulary plus merges that
build each word of training/vocab.py, so unknown words still tokenize (into characters) instead of failing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..runtime.text_encoder import BUNDLED_TOKENIZER, load_tokenizer
from .vocab import all_words


def _merge_path(tokenizer, word: str) -> tuple[str, str] | None:
    """The first two pieces of `word` as the tokenizer splits it today; None when it is already one token."""
    pieces = tokenizer.tokenize(word)
    if len(pieces) == 1:
        return None
    return pieces[0], pieces[1]


def build_tokenizer(folder: Path, words: list[str] | None = None) -> Path:
    """Write the tokenizer folder; merges are added until every word is a single token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUNDLED_TOKENIZER / "tokenizer_config.json", folder / "tokenizer_config.json")
    vocab = json.loads((BUNDLED_TOKENIZER / "vocab.json").read_text())
    specials = {k: vocab.pop(k) for k in ("<|startoftext|>", "<|endoftext|>")}
    merges: list[tuple[str, str]] = []
    for _ in range(10_000):  # a few merges per word; the bound only guards against a bug looping forever
        _write(folder, vocab, specials, merges)
        tokenizer = load_tokenizer(folder)
        todo = [pair for pair in (_merge_path(tokenizer, w) for w in words or all_words()) if pair]
        if not todo:
            return folder
        for a, b in dict.fromkeys(todo):  # one new merge per unfinished word, in order
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    raise RuntimeError("tokenizer merges did not converge")


def _write(folder: Path, vocab: dict, specials: dict, merges: list) -> None:
    full = dict(vocab)
    for name in specials:  # specials last, as CLIP orders them
        full[name] = len(full)
    (folder / "vocab.json").write_text(json.dumps(full, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
