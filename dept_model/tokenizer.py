"""Byte-level tokenizers for DEPT: training, files, digests, per-source vocabularies (TRIM's V_k)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order
KINDS: tuple[str, ...] = ("bpe", "unigram")
GLOBAL_NAME = "global"
_CACHE_FILE = "tokenizers.meta.json"
_CACHE_FORMAT = 1


class TokenizerFileError(ValueError):
    """A tokenizer file is missing, unreadable or lacks DEPT's special tokens."""


def _byte_level_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: each byte-level character stands for one byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, kind: str = "bpe") -> Tokenizer:
    """Train a byte-level tokenizer whose ids 0 and 1 are `<|endoftext|>` and `<|pad|>`.

    Every byte is in the base alphabet, so any text encodes without an unknown token. BPE training
    is deterministic for the same texts in the same order (also across processes). Unigram is not:
    the tokenizers Unigram trainer's EM depends on Rust hash-map order, so its scores vary from run
    to run; train it once and ship the file. A small corpus may yield fewer than `vocab_size`
    tokens (sw alone gives 775): always size embeddings with `tok.get_vocab_size()`.

    Args:
        texts: training documents.
        vocab_size: the largest vocabulary wanted, specials and the 256 bytes included.
        kind: "bpe" (byte-level BPE, GPT-2 style) or "unigram" (Unigram LM over byte-level symbols).

    Returns:
        The trained tokenizer.

    Raises:
        ValueError: for an unknown kind or a vocabulary too small to hold the bytes and specials.
    """
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab} (256 bytes + specials), got {vocab_size}")
    alphabet = _byte_level_alphabet()
    tok: Tokenizer
    trainer: trainers.Trainer
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,
            show_progress=False,
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,
            show_progress=False,
        )
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainer)
    for want_id, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        assert got == want_id, f"special {token} got id {got}"
    tok.encode_special_tokens = True  # see encode_batch
    logger.info(
        "tokenizer_trained kind=%s vocab_size=%d requested=%d", kind, tok.get_vocab_size(), vocab_size
    )
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike[str]) -> Path:
    """Write `tok` as tokenizers' JSON, atomically (temp file, fsync, rename).

    Args:
        tok: the tokenizer.
        path: destination file (conventionally `*.json`); parent folders are created.

    Returns:
        The path written.
    """
    return _write_atomic(Path(path), tok.to_str())


def _write_atomic(dest: Path, text: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    return dest


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer file written by `save_tokenizer` (or any tokenizers JSON with DEPT's specials).

    Raises:
        TokenizerFileError: if the file is missing, unreadable, or lacks `<|endoftext|>`/`<|pad|>`.
    """
    src = Path(path)
    if not src.is_file():
        raise TokenizerFileError(
            f"no tokenizer file at {src}: train one with build_tokenizers() or train_tokenizer()"
        )
    try:
        tok = Tokenizer.from_file(str(src))
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise TokenizerFileError(f"cannot read tokenizer {src}: {err}; delete it and retrain") from err
    eos_id(tok)
    tok.encode_special_tokens = True  # not stored in the file; see encode_batch
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The id of `<|endoftext|>`, appended after every document.

    Raises:
        TokenizerFileError: if the tokenizer lacks the token (not trained by train_tokenizer).
    """
    got = tok.token_to_id(EOS_TOKEN)
    if got is None:
        raise TokenizerFileError(f"tokenizer has no {EOS_TOKEN!r} token: train it with dept_model.tokenizer")
    return int(got)


def pad_id(tok: Tokenizer) -> int:
    """The id of `<|pad|>`.

    Raises:
        TokenizerFileError: if the tokenizer lacks the token.
    """
    got = tok.token_to_id(PAD_TOKEN)
    if got is None:
        raise TokenizerFileError(f"tokenizer has no {PAD_TOKEN!r} token: train it with dept_model.tokenizer")
    return int(got)


def special_ids(tok: Tokenizer) -> list[int]:
    """Ids of DEPT's special tokens, in order (eos, pad)."""
    return [eos_id(tok), pad_id(tok)]


def _canonical(tok: Tokenizer) -> dict[str, Any]:
    """The parts of a tokenizer that decide its ids, independent of the tokenizers version's JSON layout."""
    raw = json.loads(tok.to_str())
    model = raw["model"]
    canon: dict[str, Any] = {"type": model["type"]}
    if model["type"] == "BPE":
        canon["vocab"] = sorted(([t, i] for t, i in model["vocab"].items()), key=lambda ti: ti[1])
        # Older tokenizers write merges as "a b", newer as ["a", "b"].
        canon["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    elif model["type"] == "Unigram":
        canon["vocab"] = [[piece, float(score)] for piece, score in model["vocab"]]
        canon["unk_id"] = model.get("unk_id")
    else:
        canon["vocab"] = sorted(
            ([t, i] for t, i in tok.get_vocab(with_added_tokens=False).items()), key=lambda ti: ti[1]
        )
    canon["added"] = sorted([a["id"], a["content"], bool(a["special"])] for a in raw.get("added_tokens", []))
    return canon


def vocab_digest(tok: Tokenizer) -> str:
    """SHA-256 (hex) over the canonical JSON of the vocabulary, merges and special tokens.

    Equal for tokenizers that assign the same ids; workers and server compare it at Join.
    """
    blob = json.dumps(_canonical(tok), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def encode_batch(tok: Tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Encode documents in parallel, without special tokens (packing appends eos).

    Documents are plain text: a literal "<|endoftext|>" inside one encodes as ordinary bytes, never
    as the eos id (this sets `tok.encode_special_tokens`, which tokenizers does not save in files).

    Args:
        tok: the tokenizer.
        texts: documents.

    Returns:
        One list of token ids per document.
    """
    batch = list(texts)
    if not batch:
        return []
    tok.encode_special_tokens = True
    encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
    return [enc.ids for enc in encodings]


def source_vocab(tok: Tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """TRIM's V_k: the sorted unique global ids that occur in `texts`, plus the special tokens.

    Args:
        tok: the global tokenizer.
        texts: the source's documents (usually its train split).

    Returns:
        int64 tensor [|V_k|], strictly increasing.
    """
    seen = np.zeros(tok.get_vocab_size(), dtype=np.bool_)
    seen[special_ids(tok)] = True
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == 256:
            _mark(seen, encode_batch(tok, batch))
            batch = []
    _mark(seen, encode_batch(tok, batch))
    return torch.from_numpy(np.flatnonzero(seen).astype(np.int64))


def _mark(seen: np.ndarray, ids: list[list[int]]) -> None:
    for row in ids:
        if row:
            seen[np.asarray(row, dtype=np.int64)] = True


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """How many UTF-8 bytes each token stands for (specials 0): turns nats/token into bits/byte.

    Returns:
        int64 tensor [V].

    Raises:
        TokenizerFileError: if a token is not made of byte-level symbols.
    """
    to_byte = _unicode_to_byte()
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for token, idx in tok.get_vocab(with_added_tokens=True).items():
        if token in specials:
            continue
        if any(ch not in to_byte for ch in token):
            raise TokenizerFileError(
                f"token {token!r} (id {idx}) is not byte-level: train with dept_model.tokenizer"
            )
        lengths[idx] = len(token)
    return torch.from_numpy(lengths)


def _safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("._") or "source"


def build_tokenizers(
    sources: Sequence[str],
    *,
    vocab_size: int,
    out_dir: str | os.PathLike[str],
    per_source: bool,
    split: str = "train",
    kind: str = "bpe",
    limit_bytes: int | None = None,
) -> dict[str, Path]:
    """Train (or reuse) the global tokenizer over all sources and, if asked, one per source.

    Files: `out_dir/global.json` and, with `per_source`, `out_dir/<source>.json` (spec-opt). A
    digest of (sources, vocab size, kind, split, limit, the texts themselves) is stored beside them;
    a later call with the same inputs reuses the files instead of retraining.

    Args:
        sources: data specs (see dept_model.data.load_texts), e.g. ["sw", "en", "local:/data/x"].
        vocab_size: vocabulary size wanted for every tokenizer.
        out_dir: folder for the tokenizer files.
        per_source: also train one tokenizer per source.
        split: the split to train on.
        kind: "bpe" or "unigram".
        limit_bytes: read at most this many bytes of text per source.

    Returns:
        {"global": path, and with per_source, <source spec>: path}.

    Raises:
        ValueError: for an empty or duplicated source list, or a source whose file name collides.
        dept_model.data.DataSourceError: when a source cannot be loaded.
    """
    from dept_model.data import load_texts  # the data package imports this module

    if not sources:
        raise ValueError("build_tokenizers needs at least one source, e.g. ['sw', 'en']")
    if len(set(sources)) != len(sources):
        raise ValueError(f"sources contain duplicates: {list(sources)}")
    names = {src: _safe_name(src) for src in sources}
    if len(set(names.values())) != len(names) or GLOBAL_NAME in names.values():
        raise ValueError(f"source file names collide (or one is {GLOBAL_NAME!r}): {names}")
    out = Path(out_dir)
    texts = {src: load_texts(src, split, limit_bytes=limit_bytes) for src in sources}
    h = hashlib.sha256()
    h.update(
        json.dumps([list(sources), vocab_size, kind, split, limit_bytes, per_source, _CACHE_FORMAT]).encode()
    )
    for src in sources:
        for text in texts[src]:
            h.update(text.encode("utf-8"))
            h.update(b"\x00")
        h.update(b"\x01")
    key = h.hexdigest()
    paths = {GLOBAL_NAME: out / f"{GLOBAL_NAME}.json"}
    if per_source:
        paths.update({src: out / f"{names[src]}.json" for src in sources})
    meta_path = out / _CACHE_FILE
    if meta_path.is_file() and all(p.is_file() for p in paths.values()):
        try:
            cached_key = json.loads(meta_path.read_text(encoding="utf-8")).get("key")
        except (json.JSONDecodeError, AttributeError):
            cached_key = None  # unreadable: rebuild below
        if cached_key == key:
            logger.info("tokenizers_reused out_dir=%s key=%s", out, key[:12])
            return paths
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # invalid until every file below is written
    save_tokenizer(
        train_tokenizer((t for src in sources for t in texts[src]), vocab_size=vocab_size, kind=kind),
        paths[GLOBAL_NAME],
    )
    if per_source:
        for src in sources:
            save_tokenizer(train_tokenizer(texts[src], vocab_size=vocab_size, kind=kind), paths[src])
    digests = {name: vocab_digest(load_tokenizer(p)) for name, p in paths.items()}
    meta = {"key": key, "files": {n: p.name for n, p in paths.items()}, "digests": digests}
    _write_atomic(meta_path, json.dumps(meta, indent=1, sort_keys=True))
    logger.info("tokenizers_built out_dir=%s key=%s num_files=%d", out, key[:12], len(paths))
    return paths
