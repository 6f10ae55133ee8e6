"""Fixtures for end-to-end runs: a small global tokenizer built once from the embedded corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from dept_model.tokenizer import build_tokenizers

SOURCES = ["sw", "en"]


@pytest.fixture(scope="session")
def global_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizers")
    return build_tokenizers(SOURCES, vocab_size=512, out_dir=out, per_source=False)["global"]
