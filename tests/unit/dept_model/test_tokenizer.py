"""Tokenizers: training, files, digests, TRIM vocabularies, byte lengths, cached builds."""

from __future__ import annotations

import json

import pytest
import torch

from dept_model.data import load_texts
from dept_model.tokenizer import (
    EOS_TOKEN,
    TokenizerFileError,
    build_tokenizers,
    encode_batch,
    eos_id,
    load_tokenizer,
    pad_id,
    save_tokenizer,
    source_vocab,
    token_byte_lengths,
    train_tokenizer,
    vocab_digest,
)

VOCAB = 800
MIXED = ["Kila mtu ana haki", "中华人民共和国 法律", "Ὅμηρος ∑ 🙂 naïve café", "  tabs\tand\nnewlines  ", ""]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return (
        load_texts("la", "train", limit_bytes=60_000)
        + load_texts("zh", "train", limit_bytes=30_000)
        + load_texts("sw", "train")
    )


@pytest.fixture(scope="module")
def bpe(texts):
    return train_tokenizer(texts, vocab_size=VOCAB)


def test_specials_have_fixed_ids(bpe):
    assert bpe.token_to_id("<|endoftext|>") == 0 == eos_id(bpe)
    assert bpe.token_to_id("<|pad|>") == 1 == pad_id(bpe)
    assert bpe.get_vocab_size() == VOCAB


def test_training_is_deterministic_and_digest_tracks_the_vocabulary(texts, bpe):
    again = train_tokenizer(texts, vocab_size=VOCAB)
    assert vocab_digest(again) == vocab_digest(bpe)
    assert vocab_digest(train_tokenizer(texts, vocab_size=VOCAB - 50)) != vocab_digest(bpe)
    assert vocab_digest(train_tokenizer(texts[::-1][:40], vocab_size=VOCAB)) != vocab_digest(bpe)


def test_save_and_load_round_trip(tmp_path, texts, bpe):
    path = save_tokenizer(bpe, tmp_path / "sub" / "tok.json")
    loaded = load_tokenizer(path)
    sample = load_texts("sw", "validation") + MIXED
    assert encode_batch(loaded, sample) == encode_batch(bpe, sample)
    assert vocab_digest(loaded) == vocab_digest(bpe)
    assert not list(tmp_path.glob("sub/.*tmp"))


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(TokenizerFileError, match="build_tokenizers"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerFileError, match="retrain"):
        load_tokenizer(bad)


def test_encode_batch_matches_single_encode_and_treats_specials_as_text(bpe):
    docs = [*MIXED, f"before {EOS_TOKEN} after"]
    batch = encode_batch(bpe, docs)
    assert batch == [bpe.encode(d, add_special_tokens=False).ids for d in docs]
    assert eos_id(bpe) not in batch[-1]
    assert bpe.decode(batch[-1]) == docs[-1]
    assert encode_batch(bpe, []) == []


def test_source_vocab_is_sorted_unique_and_covers_the_source(bpe):
    sw = load_texts("sw", "train")
    v_k = source_vocab(bpe, sw)
    assert v_k.dtype == torch.int64 and v_k.ndim == 1
    assert torch.equal(v_k, torch.unique(v_k))  # sorted, unique
    assert {0, 1} <= set(v_k.tolist())
    used = {i for ids in encode_batch(bpe, sw) for i in ids}
    assert used | {0, 1} == set(v_k.tolist())
    assert len(v_k) < bpe.get_vocab_size()


def test_token_byte_lengths_sum_to_utf8_length(bpe):
    lengths = token_byte_lengths(bpe)
    assert lengths.dtype == torch.int64 and lengths.shape == (bpe.get_vocab_size(),)
    assert lengths[0] == 0 and lengths[1] == 0
    assert bool((lengths[2:] >= 1).all())
    for text in [*MIXED, *load_texts("udhr_zh", "test"), *load_texts("sw", "test")]:
        ids = bpe.encode(text, add_special_tokens=False).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
        assert bpe.decode(ids) == text


def test_unigram_trains_round_trips_and_measures_bytes(texts):
    tok = train_tokenizer(texts[:12], vocab_size=600, kind="unigram")
    assert eos_id(tok) == 0 and pad_id(tok) == 1
    lengths = token_byte_lengths(tok)
    for text in MIXED:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(["a b"], vocab_size=500, kind="wordpiece")
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer(["a b"], vocab_size=100)


def test_build_tokenizers_writes_global_and_per_source_files_and_reuses_them(tmp_path):
    local = tmp_path / "mine.jsonl"
    local.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in load_texts("la", "train", limit_bytes=20_000))
    )
    sources = ["sw", f"local:{local}"]
    out = tmp_path / "tok"
    paths = build_tokenizers(sources, vocab_size=500, out_dir=out, per_source=True, limit_bytes=20_000)
    assert set(paths) == {"global", *sources}
    assert paths["global"] == out / "global.json" and paths["sw"] == out / "sw.json"
    assert all(p.is_file() and p.parent == out for p in paths.values())
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    again = build_tokenizers(sources, vocab_size=500, out_dir=out, per_source=True, limit_bytes=20_000)
    assert again == paths
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == stamps  # reused, not retrained
    global_tok = load_tokenizer(paths["global"])
    assert set(source_vocab(global_tok, load_texts("sw", "train")).tolist()) >= {0, 1}
    other = build_tokenizers(["sw"], vocab_size=400, out_dir=tmp_path / "g", per_source=False)
    assert set(other) == {"global"}
    assert vocab_digest(load_tokenizer(other["global"])) != vocab_digest(global_tok)


def test_build_tokenizers_rejects_duplicates(tmp_path):
    with pytest.raises(ValueError, match="duplicates"):
        build_tokenizers(["sw", "sw"], vocab_size=300, out_dir=tmp_path, per_source=False)
