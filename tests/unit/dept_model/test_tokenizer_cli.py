"""dept-tokenizer: trains the global and per-source tokenizers from data specs and prints their digests."""

from __future__ import annotations

import json

from click.testing import CliRunner

from dept_model.tokenizer import load_tokenizer, vocab_digest
from dept_model.tokenizer_cli import main


def _rows(output: str) -> dict[str, dict]:
    return {row["name"]: row for row in map(json.loads, output.splitlines())}


def test_prints_the_digest_of_every_file_it_writes_and_reuses_them(tmp_path) -> None:
    args = [
        "--data",
        "sw,embedded:en",
        "--vocab-size",
        "300",
        "--out",
        str(tmp_path / "tok"),
        "--per-source",
        "--json",
    ]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    rows = _rows(first.output)
    assert set(rows) == {"global", "sw", "embedded:en"}
    for row in rows.values():
        tok = load_tokenizer(row["path"])
        assert row["digest"] == vocab_digest(tok)  # what dept-server and dept-worker compare at Join
        assert row["vocab_size"] == tok.get_vocab_size() <= 300
    assert len({r["digest"] for r in rows.values()}) == 3
    mtimes = {
        n: (tmp_path / "tok" / r["path"].rsplit("/", 1)[-1]).stat().st_mtime_ns for n, r in rows.items()
    }
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and _rows(second.output) == rows
    assert mtimes == {
        n: (tmp_path / "tok" / r["path"].rsplit("/", 1)[-1]).stat().st_mtime_ns for n, r in rows.items()
    }


def test_global_only_table_output(tmp_path) -> None:
    result = CliRunner().invoke(main, ["--data", "sw", "--vocab-size", "300", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (line,) = result.output.splitlines()
    name, size, digest, path = line.split()
    assert name == "global" and digest == vocab_digest(load_tokenizer(path)) and int(size) <= 300


def test_an_unknown_source_is_a_usage_error(tmp_path) -> None:
    result = CliRunner().invoke(main, ["--data", "sw,klingon", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown source 'klingon'" in result.output
