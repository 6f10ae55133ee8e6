"""Data sources for DEPT: the embedded corpus, local files and Hugging Face datasets, and token packing."""

from __future__ import annotations

from dept_model.data.catalog import SPLITS, DataSpec, load_texts, parse_spec, truncate_texts
from dept_model.data.corpus import corpus_dir, list_sources, manifest, source_info
from dept_model.data.errors import DataSourceError, StreamTooShortError
from dept_model.data.packing import TokenBatches, eval_batches, tokenize_texts

__all__ = [
    "SPLITS",
    "DataSourceError",
    "DataSpec",
    "StreamTooShortError",
    "TokenBatches",
    "corpus_dir",
    "eval_batches",
    "list_sources",
    "load_texts",
    "manifest",
    "parse_spec",
    "source_info",
    "tokenize_texts",
    "truncate_texts",
]
