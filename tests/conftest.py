"""Shared pytest configuration: CPU-only, small thread counts, GPU tests skipped without CUDA.

Also the session's one real run (``real_run``, see tests/fixtures/real_run.py); every test that
uses it is marked ``slow`` here, so ``scripts/check.sh --fast`` leaves it out.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.fixtures.real_run import RUN_BUDGET_S, TEST_TIMEOUT_S, RealRun, run_once

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "real_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
            # The first test to use the run sets it up inside its own timeout: it needs room.
            mark = item.get_closest_marker("timeout")
            if mark is None or not mark.args or float(mark.args[0]) < TEST_TIMEOUT_S:
                raise pytest.UsageError(
                    f"{item.nodeid} uses real_run: mark it pytest.mark.timeout(TEST_TIMEOUT_S) "
                    f"({TEST_TIMEOUT_S} s, tests/fixtures/real_run.py); the run alone may take {RUN_BUDGET_S:.0f} s"
                )
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on a GPU host; see README)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    """A finished tiny real run (server + 2 workers, glob, 2 rounds); read-only, once per session."""
    root: Path = tmp_path_factory.mktemp("real-run")
    return run_once(root)
