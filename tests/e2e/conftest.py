"""Fixtures for end-to-end runs: a small global tokenizer built once from the embedded corpus.

Every test here is ``slow`` (skipped by ``scripts/check.sh --fast``). Each carries its own
``pytest.mark.timeout`` above the sum of the harness waits it can make; one that does not gets
``DEFAULT_TIMEOUT_S``, which is above any single run of the harness's default waits, so the
harness's diagnosis, not a bare pytest-timeout, reports a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dept_model.tokenizer import build_tokenizers
from tests.e2e.harness import EXIT_S, MARGIN_S, RUN_S, START_S, kill_leftovers

SOURCES = ["sw", "en"]
DEFAULT_TIMEOUT_S = START_S + RUN_S + EXIT_S + MARGIN_S
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))


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
