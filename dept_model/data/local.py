"""Text from local files: jsonl (field `text`), txt (blank-line-separated blocks), parquet, or folders."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import zstandard

from dept_model.data.errors import DataSourceError

logger = logging.getLogger(__name__)

TEXT_FIELD = "text"
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
TXT_SUFFIXES: tuple[str, ...] = (".txt", ".txt.gz", ".txt.zst")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + TXT_SUFFIXES + PARQUET_SUFFIXES
# Folder files are matched to splits by these names (a path part equal to one, or starting with it and -/_).
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
HELDOUT_EVERY = 20  # a single file holds out 1/20 of its documents for validation and 1/20 for test
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _read_bytes(path: Path) -> bytes:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".zst"):
        with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
            return reader.read()
    return path.read_bytes()


def read_file(path: Path) -> list[str]:
    """The documents in one file, in file order; empty documents are dropped.

    Raises:
        DataSourceError: for an unsupported suffix, bad JSON, or a record without a `text` field.
    """
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return _read_parquet(path)
    if name.endswith(TXT_SUFFIXES):
        text = _read_bytes(path).decode("utf-8")
        return [block.strip() for block in _BLANK_LINE.split(text) if block.strip()]
    if name.endswith(JSONL_SUFFIXES):
        return _read_jsonl(path)
    raise DataSourceError(f"cannot read {path}: supported files end with {', '.join(SUPPORTED_SUFFIXES)}")


def _read_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    for lineno, line in enumerate(_read_bytes(path).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(
                f"{path}:{lineno} is not JSON Lines ({err}): write one JSON object per line"
            ) from err
        if not isinstance(row, dict) or not isinstance(row.get(TEXT_FIELD), str):
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataSourceError(
                f"{path}:{lineno} has no string field {TEXT_FIELD!r} (found {fields}): add one"
            )
        if row[TEXT_FIELD].strip():
            docs.append(row[TEXT_FIELD])
    return docs


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # pyarrow ships no type stubs

    names: list[str] = pq.read_schema(path).names
    if TEXT_FIELD not in names:
        raise DataSourceError(
            f"{path} has no column {TEXT_FIELD!r} (columns: {names}): rename the text column"
        )
    column: list[str | None] = pq.read_table(path, columns=[TEXT_FIELD]).column(TEXT_FIELD).to_pylist()
    return [doc for doc in column if doc is not None and doc.strip()]


def _split_of(rel: Path) -> str | None:
    for part in rel.parts:
        stem = part.lower().split(".", 1)[0]
        for split, aliases in SPLIT_ALIASES.items():
            if any(stem == a or stem.startswith((f"{a}-", f"{a}_")) for a in aliases):
                return split
    return None


def heldout_split(docs: list[str], split: str, *, what: str) -> list[str]:
    """Deterministic held-out slices of one document list.

    The last n//20 documents (at least one) are test, the n//20 before them validation, the rest train.

    Raises:
        DataSourceError: with fewer than 3 documents.
    """
    n = len(docs)
    if n < 3:
        raise DataSourceError(
            f"{what} has {n} document(s), too few to hold out validation and test: separate documents by "
            "blank lines (txt) or lines (jsonl), or give a folder with train/validation/test files"
        )
    k = max(1, n // HELDOUT_EVERY)
    bounds = {"train": (0, n - 2 * k), "validation": (n - 2 * k, n - k), "test": (n - k, n)}
    lo, hi = bounds[split]
    return docs[lo:hi]


def read_local(path: Path, split: str) -> list[str]:
    """The documents of `split` under a file or folder.

    A file is all of the corpus: held-out slices give validation and test (see `heldout_split`). In a
    folder, files whose path names a split (`train.jsonl`, `validation/part-0.parquet`,
    `test-00000-of-00001.parquet`, aliases `valid`, `val`, `dev`) form that split; a folder without
    such names is one corpus, read in sorted path order and sliced like a file.

    Raises:
        DataSourceError: if the path is missing, holds no supported file, or lacks the split.
    """
    path = path.expanduser()
    if path.is_file():
        return heldout_split(read_file(path), split, what=str(path))
    if not path.is_dir():
        raise DataSourceError(f"local path {path} does not exist: check the local:/path spec")
    files = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p) and not p.name.startswith("."))
    if not files:
        raise DataSourceError(
            f"{path} holds no {', '.join(SUPPORTED_SUFFIXES)} files: add some or fix the path"
        )
    by_split: dict[str, list[Path]] = {}
    for f in files:
        s = _split_of(f.relative_to(path))
        if s is not None:
            by_split.setdefault(s, []).append(f)
    if not by_split:
        docs = [doc for f in files for doc in read_file(f)]
        return heldout_split(docs, split, what=str(path))
    if split not in by_split:
        raise DataSourceError(
            f"{path} has files for splits {sorted(by_split)} but none for {split!r}: add e.g. {split}.jsonl"
        )
    logger.debug("local_read path=%s split=%s files=%d", path, split, len(by_split[split]))
    return [doc for f in by_split[split] for doc in read_file(f)]
