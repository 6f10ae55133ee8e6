"""Data specs (embedded, local, hf), the shipped corpus and its notices, and token packing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from dept_model.data import (
    SPLITS,
    DataSourceError,
    StreamTooShortError,
    TokenBatches,
    corpus_dir,
    eval_batches,
    list_sources,
    load_texts,
    manifest,
    parse_spec,
    tokenize_texts,
)
from dept_model.data.hub import parse_hub_spec
from dept_model.tokenizer import EOS_TOKEN, train_tokenizer

REPO = Path(__file__).resolve().parents[3]
TRAINING_SOURCES = {
    "code",
    "en",
    "it",
    "la",
    "legal",
    "literature",
    "ms",
    "speeches",
    "sr",
    "sw",
    "techdocs",
    "ur_ui",
    "zh",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(
        load_texts("sw", "train") + load_texts("en", "train", limit_bytes=60_000), vocab_size=1000
    )


def docs(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix} {i}: " + " ".join(["maneno mengi"] * (i % 5 + 1)) for i in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8"
    )
    return path


# --- the shipped corpus ---------------------------------------------------------------------------


def test_list_sources():
    assert set(list_sources()) == TRAINING_SOURCES
    everything = list_sources(include_test_only=True)
    assert {s for s in everything if s.startswith("udhr_")} == {
        f"udhr_{x}" for x in ("en", "it", "zh", "la", "sw", "ur", "sr", "ms")
    }
    assert everything == sorted(everything)


def test_every_embedded_source_loads_every_split_offline():
    for name in list_sources(include_test_only=True):
        splits = manifest()["sources"][name]["splits"]
        expected = set(SPLITS) if name in TRAINING_SOURCES else {"test"}
        assert set(splits) == expected, name
        for split in splits:
            texts = load_texts(name, split)
            assert texts and all(isinstance(t, str) and t for t in texts), (name, split)
    assert load_texts("embedded:sw", "train") == load_texts("sw", "train")


def test_sw_is_a_tiny_but_complete_source():
    parts = {split: load_texts("sw", split) for split in SPLITS}
    assert all(parts.values())
    assert sum(len(t.encode()) for p in parts.values() for t in p) < 12_000
    flat = [t for p in parts.values() for t in p]
    assert len(set(flat)) == len(flat)  # splits are disjoint
    udhr = load_texts("udhr_sw", "test")[0]
    assert all(t in udhr for t in flat)
    with pytest.raises(DataSourceError, match="test-only"):
        load_texts("udhr_sw", "train")


def test_manifest_matches_the_shipped_files():
    root = corpus_dir()
    listed = set()
    for name, entry in manifest()["sources"].items():
        assert entry["license"] and entry["origin"] and entry["kind"] in {"language", "domain", "parallel"}
        for split, meta in entry["splits"].items():
            assert meta["file"] == f"{name}.{split}.jsonl.zst"
            blob = (root / meta["file"]).read_bytes()
            listed.add(meta["file"])
            assert len(blob) == meta["compressed_bytes"]
            assert hashlib.sha256(blob).hexdigest() == meta["sha256"]
            rows = [json.loads(line) for line in zstandard.ZstdDecompressor().decompress(blob).splitlines()]
            assert len(rows) == meta["docs"]
            assert sum(len(r["text"].encode()) for r in rows) == meta["text_bytes"]
    shipped = {p.name for p in root.iterdir() if p.name.endswith(".zst")}
    assert shipped == listed
    assert sum((root / f).read_bytes().__len__() for f in shipped) < 5_000_000


def test_notices_name_every_source_and_licence():
    notice_md = (corpus_dir() / "NOTICE.md").read_text(encoding="utf-8")
    notice_root = (REPO / "NOTICE").read_text(encoding="utf-8")
    for text in (notice_md, notice_root):
        for name, entry in manifest()["sources"].items():
            assert f"`{name}`" in text and entry["license"] in text, name
        for licence in ("PSF-2.0", "MPL-2.0", "BSD-3-Clause", "CC BY-SA 3.0", "public domain", "CC0"):
            assert licence in text


def test_limit_bytes_keeps_a_prefix():
    full = load_texts("en", "train")
    cut = load_texts("en", "train", limit_bytes=10_000)
    assert sum(len(t.encode()) for t in cut) == 10_000
    assert cut[:-1] == full[: len(cut) - 1] and full[len(cut) - 1].startswith(cut[-1])
    zh = load_texts("zh", "train", limit_bytes=1001)  # cut inside a 3-byte character
    assert sum(len(t.encode()) for t in zh) <= 1001
    with pytest.raises(DataSourceError, match="positive"):
        load_texts("en", "train", limit_bytes=0)


# --- specs and errors -----------------------------------------------------------------------------


def test_unknown_sources_splits_and_schemes_raise():
    with pytest.raises(DataSourceError, match="local:/path"):
        load_texts("klingon", "train")
    with pytest.raises(DataSourceError, match="local:/data/x.jsonl"):
        parse_spec("/data/x.jsonl")
    with pytest.raises(DataSourceError, match="unknown embedded source"):
        load_texts("embedded:klingon", "train")
    with pytest.raises(DataSourceError, match="unknown split"):
        load_texts("sw", "dev")
    with pytest.raises(DataSourceError, match="unknown scheme"):
        load_texts("s3:bucket/x", "train")
    with pytest.raises(DataSourceError, match="empty target"):
        load_texts("local:", "train")


def test_missing_local_path_raises(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        load_texts(f"local:{tmp_path / 'nope.jsonl'}", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="holds no"):
        load_texts(f"local:{tmp_path / 'empty'}", "train")


def test_hf_spec_offline_raises_with_the_fix():
    with pytest.raises(DataSourceError) as info:
        load_texts("hf:allenai/c4/sw", "train", limit_bytes=1000)
    message = str(info.value)
    assert "offline" in message and "HF_HUB_OFFLINE" in message
    assert "local:" in message and "embedded" in message
    assert parse_hub_spec("allenai/c4/sw") == ("allenai/c4", "sw")
    assert parse_hub_spec("allenai/c4") == ("allenai/c4", None)
    with pytest.raises(DataSourceError, match="hf:OWNER/NAME"):
        parse_spec("hf:a/b/c/d")


# --- local files ----------------------------------------------------------------------------------


def test_local_jsonl_file_holds_out_validation_and_test(tmp_path):
    texts = docs(60)
    spec = f"local:{write_jsonl(tmp_path / 'corpus.jsonl', texts)}"
    parts = {split: load_texts(spec, split) for split in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [54, 3, 3]
    assert parts["train"] + parts["validation"] + parts["test"] == texts
    assert load_texts(spec, "validation") == parts["validation"]  # deterministic


def test_local_txt_splits_on_blank_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(docs(10)) + "\n \n\n", encoding="utf-8")
    spec = f"local:{path}"
    assert load_texts(spec, "train") == docs(10)[:8]
    assert load_texts(spec, "test") == docs(10)[9:]
    one = tmp_path / "one.txt"
    one.write_text("a single block\nof text\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match="too few"):
        load_texts(f"local:{one}", "train")


def test_local_parquet_and_compressed_jsonl(tmp_path):
    texts = docs(40, "pq")
    pq.write_table(pa.table({"text": texts, "n": list(range(40))}), tmp_path / "data.parquet")
    assert load_texts(f"local:{tmp_path / 'data.parquet'}", "train") == texts[:36]
    raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "data.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert load_texts(f"local:{tmp_path / 'data.jsonl.zst'}", "test") == texts[38:]
    pq.write_table(pa.table({"body": texts}), tmp_path / "bad.parquet")
    with pytest.raises(DataSourceError, match="no column 'text'"):
        load_texts(f"local:{tmp_path / 'bad.parquet'}", "train")
    write_jsonl(tmp_path / "bad.jsonl", [])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataSourceError, match="no string field 'text'"):
        load_texts(f"local:{tmp_path / 'bad.jsonl'}", "train")


def test_local_directory_picks_files_by_split_name(tmp_path):
    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    write_jsonl(root / "train.jsonl", docs(5, "tr"))
    pq.write_table(pa.table({"text": docs(3, "tr2")}), root / "data" / "train-00001-of-00002.parquet")
    (root / "valid.txt").write_text("\n\n".join(docs(2, "va")), encoding="utf-8")
    spec = f"local:{root}"
    assert load_texts(spec, "train") == docs(3, "tr2") + docs(5, "tr")  # sorted by path
    assert load_texts(spec, "validation") == docs(2, "va")
    with pytest.raises(DataSourceError, match="none for 'test'"):
        load_texts(spec, "test")


def test_local_directory_without_split_names_is_one_corpus(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"part{i}.jsonl", docs(20, f"p{i}"))
    spec = f"local:{tmp_path}"
    assert len(load_texts(spec, "train")) == 54
    assert load_texts(spec, "test") == docs(20, "p2")[17:]


# --- packing --------------------------------------------------------------------------------------


def test_tokenize_texts_appends_eos_after_every_document(tok):
    texts = ["habari ya asubuhi", f"a literal {EOS_TOKEN} inside", "mwisho"]
    stream = tokenize_texts(tok, texts)
    assert stream.dtype == np.int64 and stream.ndim == 1
    eos_positions = np.flatnonzero(stream == 0)
    assert len(eos_positions) == 3 and eos_positions[-1] == len(stream) - 1
    assert tok.decode(stream[: eos_positions[0]].tolist()) == texts[0]
    assert len(tokenize_texts(tok, [])) == 0


def test_sw_packs_at_seq_len_128(tok):
    train = tokenize_texts(tok, load_texts("sw", "train"))
    batches = TokenBatches(train, seq_len=128, batch_size=8, seed=0)
    x, y = batches.next_batch()
    assert x.shape == y.shape == (8, 128) and x.dtype == y.dtype == torch.int64
    for split in ("validation", "test"):
        evals = list(eval_batches(tokenize_texts(tok, load_texts("sw", split)), seq_len=128, batch_size=4))
        assert evals and evals[0][0].shape[1] == 128


def test_batches_are_shifted_windows_of_the_stream():
    tokens = np.arange(1000, dtype=np.int64)
    batches = TokenBatches(tokens, seq_len=10, batch_size=4, seed=3)
    x, y = batches.next_batch()
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert bool((x[:, 0] % 10 == 0).all())
    seen = [int(v) for _ in range(batches.num_windows) for v in batches.next_batch()[0][:, 0]]
    # every window once per epoch: the first full epoch is a permutation of the windows
    first_epoch = [int(v) for v in x[:, 0]] + seen[: batches.num_windows - 4]
    assert sorted(first_epoch) == list(range(0, 990, 10))


def test_batches_are_deterministic_per_seed_and_differ_across_seeds():
    tokens = np.random.default_rng(0).integers(0, 500, size=5000)

    def run(seed):
        b = TokenBatches(tokens, seq_len=16, batch_size=8, seed=seed)
        return [b.next_batch() for _ in range(80)]  # crosses several epochs (312 windows)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))


def test_state_dict_resume_continues_exactly():
    tokens = np.random.default_rng(1).integers(0, 500, size=3000)
    full = TokenBatches(tokens, seq_len=32, batch_size=5, seed=7)
    reference = [full.next_batch() for _ in range(60)]
    first = TokenBatches(tokens, seq_len=32, batch_size=5, seed=7)
    for _ in range(23):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert {"epoch", "position", "seed"} <= set(state) and state["epoch"] >= 1
    resumed = TokenBatches(tokens, seq_len=32, batch_size=5, seed=0)
    resumed.load_state_dict(state)
    for k in range(23, 60):
        x, y = resumed.next_batch()
        assert torch.equal(x, reference[k][0]) and torch.equal(y, reference[k][1]), k
    with pytest.raises(ValueError, match="seq_len"):
        TokenBatches(tokens, seq_len=16, batch_size=5, seed=7).load_state_dict(state)


def test_batch_larger_than_the_number_of_windows():
    batches = TokenBatches(np.arange(31, dtype=np.int64), seq_len=10, batch_size=7, seed=0)
    x, _ = batches.next_batch()
    assert x.shape == (7, 10) and batches.num_windows == 3
    assert batches.state_dict()["epoch"] == 2


def test_eval_batches_are_ordered_and_non_overlapping():
    tokens = np.arange(105, dtype=np.int64)
    batches = list(eval_batches(tokens, seq_len=10, batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    starts = [int(v) for x, _ in batches for v in x[:, 0]]
    assert starts == list(range(0, 100, 10))
    assert len(list(eval_batches(tokens, seq_len=10, batch_size=4, max_batches=2))) == 2


def test_short_streams_raise_a_clear_error():
    with pytest.raises(StreamTooShortError, match="lower seq_len") as info:
        TokenBatches(np.arange(10, dtype=np.int64), seq_len=16, batch_size=2, seed=0)
    assert info.value.num_tokens == 10 and isinstance(info.value, DataSourceError)
    with pytest.raises(StreamTooShortError):
        next(eval_batches(np.arange(16, dtype=np.int64), seq_len=16, batch_size=2))
