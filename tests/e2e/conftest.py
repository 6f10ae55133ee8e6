"""Fixtures for end-to-end runs: a small global tokenizer built once from the embedded corpus."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dept_model.tokenizer import build_tokenizers
from tests.e2e.harness import kill_leftovers

SOURCES = ["sw", "en"]


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    yield
    kill_leftovers()


@pytest.fixture(scope="session")
def vocabs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The global tokenizer (key "global") and one per source (spec-opt), trained once."""
    out = tmp_path_factory.mktemp("tokenizers")
    return build_tokenizers(SOURCES, vocab_size=512, out_dir=out, per_source=True)


@pytest.fixture(scope="session")
def global_vocab(vocabs: dict[str, Path]) -> Path:
    return vocabs["global"]
