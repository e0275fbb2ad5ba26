"""Helpers shared by the serving tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import _make_hf_model
from tests.unit.text_tokenizers import byte_level_folder, corpus_lines


def text_model(root: Path) -> Path:
    """A tiny random Llama (vocab 1024) with a real byte-level BPE tokenizer next to it."""
    model = _make_hf_model("llama-gqa", root / "model", vocab_size=1024)
    tok = byte_level_folder(root / "tok", corpus_lines(50_000))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, model / name)
    return model
