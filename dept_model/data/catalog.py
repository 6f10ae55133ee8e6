"""Data specs: "sw" / "embedded:sw" (shipped corpus), "local:/path", "hf:NAME[/CONFIG]" -> documents."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dept_model.data import corpus, hub, local
from dept_model.data.errors import DataSourceError

logger = logging.getLogger(__name__)

SPLITS = corpus.SPLITS
SCHEMES: tuple[str, ...] = ("embedded", "local", "hf")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSpec:
    """A parsed data spec: where the text comes from."""

    scheme: str  # one of SCHEMES
    target: str  # embedded source name, local path, or Hub "NAME[/CONFIG]"

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"


def parse_spec(spec: str) -> DataSpec:
    """Resolve a spec string; a bare name means an embedded source.

    Raises:
        DataSourceError: for an empty target, an unknown scheme, or an unknown bare name.
    """
    scheme, sep, target = spec.partition(":")
    if not sep:
        if spec not in corpus.list_sources(include_test_only=True):
            looks_like_path = "/" in spec or spec.startswith((".", "~"))
            hint = f"; for a file write local:{spec}" if looks_like_path else ""
            raise DataSourceError(
                f"unknown source {spec!r}: embedded sources are {corpus.list_sources()} (test-only: udhr_*); "
                f"other data is local:/path or hf:NAME[/CONFIG]{hint}"
            )
        return DataSpec(scheme="embedded", target=spec)
    if scheme not in SCHEMES:
        raise DataSourceError(
            f"unknown scheme {scheme!r} in {spec!r}: use one of {', '.join(s + ':' for s in SCHEMES)}"
        )
    if not target:
        raise DataSourceError(
            f"empty target in {spec!r}: e.g. embedded:sw, local:/data/sw.jsonl, hf:allenai/c4/sw"
        )
    if scheme == "embedded":
        corpus.source_info(target)  # raises for an unknown name
    if scheme == "hf":
        hub.parse_hub_spec(target)
    return DataSpec(scheme=scheme, target=target)


def truncate_texts(texts: list[str], limit_bytes: int | None) -> list[str]:
    """The leading documents holding the first `limit_bytes` UTF-8 bytes; the last one is cut at a character."""
    if limit_bytes is None:
        return texts
    out: list[str] = []
    left = limit_bytes
    for text in texts:
        raw = text.encode("utf-8")
        if len(raw) >= left:
            cut = raw[:left].decode("utf-8", errors="ignore")
            if cut:
                out.append(cut)
            break
        out.append(text)
        left -= len(raw)
    return out


def load_texts(spec: str, split: str, *, limit_bytes: int | None = None) -> list[str]:
    """The documents of one source and split.

    Embedded and local specs work offline (HF_HUB_OFFLINE=1); hf specs stream with `datasets`.

    Args:
        spec: "sw" or "embedded:sw" (see list_sources), "local:/path" (a .jsonl/.txt/.parquet file
            or a folder of them), or "hf:OWNER/NAME[/CONFIG]" such as "hf:allenai/c4/sw".
        split: "train", "validation" or "test".
        limit_bytes: keep only the first this many UTF-8 bytes of text (hf default: 64 MiB).

    Returns:
        Documents in a deterministic order (empty documents dropped).

    Raises:
        DataSourceError: for an unknown source or split, a missing path, an unreadable file, or an
            hf spec offline; the message names the fix.
    """
    if split not in SPLITS:
        raise DataSourceError(f"unknown split {split!r}: use one of {SPLITS}")
    if limit_bytes is not None and limit_bytes <= 0:
        raise DataSourceError(f"limit_bytes must be positive or None, got {limit_bytes}")
    parsed = parse_spec(spec)
    if parsed.scheme == "embedded":
        texts = corpus.read_embedded(parsed.target, split)
    elif parsed.scheme == "local":
        texts = local.read_local(Path(parsed.target), split)
    else:
        texts = hub.read_hub(parsed.target, split, limit_bytes=limit_bytes)
    texts = truncate_texts(texts, limit_bytes)
    if not texts:
        raise DataSourceError(f"{spec} has no text in split {split!r}: add documents to it")
    logger.info("texts_loaded spec=%s split=%s docs=%d", parsed, split, len(texts))
    return texts
