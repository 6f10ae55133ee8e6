"""The embedded corpus shipped inside the package: manifest, source list and zstd jsonl reading."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import zstandard

from dept_model.data.errors import DataSourceError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
_PACKAGE = "dept_model.data"
_FORMAT_VERSION = 1


def corpus_dir() -> Traversable:
    """Where the shipped corpus files live (inside the installed package)."""
    return resources.files(_PACKAGE) / "corpus"


@functools.cache
def manifest() -> dict[str, Any]:
    """The parsed `corpus/manifest.json`: per source its kind, licence, origin and split files.

    Raises:
        DataSourceError: if the manifest is missing or of an unknown format (a broken install).
    """
    path = corpus_dir() / "manifest.json"
    if not path.is_file():
        raise DataSourceError(
            "the embedded corpus is missing (no dept_model/data/corpus/manifest.json): reinstall dept, "
            "or rebuild it with scripts/build_corpus.py"
        )
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format_version") != _FORMAT_VERSION:
        raise DataSourceError(
            f"embedded corpus manifest has format {doc.get('format_version')!r}, expected {_FORMAT_VERSION}: "
            "reinstall dept"
        )
    return doc


def list_sources(*, include_test_only: bool = False) -> list[str]:
    """Names of the embedded sources, sorted.

    Args:
        include_test_only: also list the test-only parallel texts (`udhr_*`).

    Returns:
        Source names usable as specs, e.g. "sw" or "embedded:sw".
    """
    sources: dict[str, Any] = manifest()["sources"]
    return sorted(n for n, e in sources.items() if include_test_only or "train" in e["splits"])


def source_info(name: str) -> dict[str, Any]:
    """The manifest entry of one embedded source (kind, license, origin, splits).

    Raises:
        DataSourceError: for an unknown name.
    """
    sources: dict[str, Any] = manifest()["sources"]
    if name not in sources:
        raise DataSourceError(
            f"unknown embedded source {name!r}: choose one of {list_sources(include_test_only=True)}, "
            "or give a local:/path or hf:NAME spec"
        )
    entry: dict[str, Any] = sources[name]
    return entry


def read_embedded(name: str, split: str) -> list[str]:
    """The documents of one embedded source and split, in the shipped order.

    Raises:
        DataSourceError: for an unknown source or split, or a corrupt file.
    """
    return list(_read_cached(name, split))


@functools.cache
def _read_cached(name: str, split: str) -> tuple[str, ...]:
    entry = source_info(name)
    if split not in entry["splits"]:
        hint = " (a test-only parallel text)" if entry["kind"] == "parallel" else ""
        raise DataSourceError(
            f"embedded source {name!r}{hint} has no {split!r} split, only {sorted(entry['splits'])}: "
            f"ask for one of those, or train on one of {list_sources()}"
        )
    meta = entry["splits"][split]
    blob = (corpus_dir() / meta["file"]).read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise DataSourceError(
            f"embedded corpus file {meta['file']} is corrupt (checksum mismatch): reinstall dept"
        )
    raw = zstandard.ZstdDecompressor().decompress(blob)
    texts = tuple(json.loads(line)["text"] for line in raw.decode("utf-8").splitlines() if line)
    if len(texts) != meta["docs"]:
        raise DataSourceError(
            f"embedded corpus file {meta['file']} has {len(texts)} documents, manifest says {meta['docs']}"
        )
    logger.debug("embedded_read source=%s split=%s docs=%d", name, split, len(texts))
    return texts
