"""Shared pytest configuration: CPU-only, small thread counts, GPU tests skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on a GPU host; see README)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
