"""dept-report on the metrics file a real run wrote: tables, final pull, plots, malformed input, CLI.

The numbers in the report are checked against the metrics lines they come from (the session's
real run, tests/fixtures/real_run.py), so a report that reads a field the server does not write
shows up as an empty cell here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dept_comm.accounting import RoundMetrics
from dept_comm.server.metrics_http import summary_table
from dept_server.report import MISSING, MetricsFileError, load_records, main, render_markdown, write_report
from tests.fixtures.real_run import TEST_TIMEOUT_S, RealRun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BYTE_FIELDS = ("up_payload_bytes", "down_payload_bytes", "up_raw_bytes", "down_raw_bytes")
RATIOS = ("up_vs_full_model", "down_vs_full_model", "up_vs_uncompressed", "down_vs_uncompressed")

real = pytest.mark.timeout(TEST_TIMEOUT_S)  # the session's real run may be set up by this test


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section {heading!r} in:\n{text}"
    return match.group(1)


def table(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table in a section, as stripped cells."""
    rows = [line for line in section(text, heading).splitlines() if line.startswith("|")]
    assert len(rows) >= 2 and set(rows[1]) <= {"|", "-"}, rows
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def exact_bytes(cell: str) -> int:
    """The exact count of a bytes cell: ``1.50 KiB (1,536 B)`` or ``512 B``."""
    match = re.search(r"\(([\d,]+) B\)", cell) or re.fullmatch(r"(\d+) B", cell)
    assert match, cell
    return int(match.group(1).replace(",", ""))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000


@pytest.fixture(scope="module")
def report(real_run: RealRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("report")
    path = write_report(real_run.metrics_path, out)
    assert path == out / "report.md"
    return path.read_text(), out


@real
def test_round_tables_carry_the_servers_numbers(real_run: RealRun, report: tuple[str, Path]) -> None:
    text, _ = report
    rounds = real_run.round_lines
    assert [r["round"] for r in rounds] == list(range(real_run.rounds))
    assert f"Variant: {real_run.variant}" in text

    rows = table(text, "Bytes per round")
    assert [row[0] for row in rows] == [str(r["round"]) for r in rounds]  # the final line is no round
    for row, r in zip(rows, rounds, strict=True):
        assert row[1] == str(r["num_workers"]) == str(len(real_run.sources))
        assert [exact_bytes(c) for c in row[2:6]] == [r[k] for k in BYTE_FIELDS], (row, r)
        ratios = row[6:10]
        assert MISSING not in ratios, f"ratio columns left empty: {row}"
        assert ratios == [format(r["ratios"][k], ".3g") for k in RATIOS]
        assert row[10] == format(r["duration_s"], ".1f")

    totals = table(text, "Totals")
    assert totals[0][0] == "Payload bytes"
    assert exact_bytes(totals[0][1]) == sum(r["up_payload_bytes"] for r in rounds)
    assert exact_bytes(totals[0][2]) == sum(r["down_payload_bytes"] for r in rounds)
    assert exact_bytes(totals[1][1]) == sum(r["up_raw_bytes"] for r in rounds)
    up_ratio = sum(r["up_payload_bytes"] for r in rounds) / sum(r["up_raw_bytes"] for r in rounds)
    assert totals[2] == [
        "Payload / raw",
        f"{up_ratio:.3g}",
        f"{sum(r['down_payload_bytes'] for r in rounds) / sum(r['down_raw_bytes'] for r in rounds):.3g}",
    ]
    assert up_ratio < 0.5, "int8 up: a quarter of fp32 plus headers"
    assert f"Rounds: {len(rounds)}; duration: {sum(r['duration_s'] for r in rounds):.1f} s total" in text

    workers = table(text, "Bytes per worker")
    expected = [(r, w) for r in rounds for w in r["workers"]]
    assert len(workers) == len(expected) == len(rounds) * len(real_run.sources)
    for row, (r, w) in zip(workers, expected, strict=True):
        assert row[:3] == [str(r["round"]), w["worker_id"], w["source"]]
        assert [exact_bytes(c) for c in row[3:7]] == [w[k] for k in BYTE_FIELDS]
        assert row[7] == format(w["train_loss"], ".4f")


@real
def test_the_final_pull_is_shown_as_such(real_run: RealRun, report: tuple[str, Path]) -> None:
    text, _ = report
    final, rounds = real_run.final_line, real_run.round_lines
    assert final["round"] == real_run.rounds and final["up_payload_bytes"] == 0
    assert final["down_payload_bytes"] > 0, "workers pull the final body to evaluate it"
    assert "(final)" not in section(text, "Bytes per round")
    assert f"Workers pulled the final body after round {rounds[-1]['round']} to evaluate it" in text
    pull = table(text, "Final pull")
    assert pull[0][0] == "Payload bytes" and exact_bytes(pull[0][1]) == 0
    assert exact_bytes(pull[0][2]) == final["down_payload_bytes"]
    assert exact_bytes(pull[1][2]) == final["down_raw_bytes"]
    whole = re.search(r"Whole run, rounds plus final pull: (.+) up, (.+) down \(payload\)", text)
    assert whole, section(text, "Final pull")
    assert exact_bytes(whole.group(1)) == sum(r["up_payload_bytes"] for r in rounds)
    assert exact_bytes(whole.group(2)) == sum(r["down_payload_bytes"] for r in [*rounds, final])


@real
def test_perplexity_first_last_and_final(real_run: RealRun, report: tuple[str, Path]) -> None:
    text, out = report
    rounds, final = real_run.round_lines, real_run.final_line
    rows = {row[0]: row[1:] for row in table(text, "Perplexity")}
    assert set(rows) == set(real_run.sources)
    for source, row in rows.items():
        first, last = rounds[0]["eval"][source], rounds[-1]["eval"][source]
        assert row == [
            str(rounds[0]["round"]), format(first["ppl"], ".2f"), format(first["bits_per_byte"], ".4f"),
            str(rounds[-1]["round"]), format(last["ppl"], ".2f"), format(last["bits_per_byte"], ".4f"),
            str(final["round"]), format(final["eval"][source]["ppl"], ".2f"),
            format(final["eval"][source]["bits_per_byte"], ".4f"),
        ]  # fmt: skip
    assert "(bytes_per_round.png)" in text and "(perplexity.png)" in text
    for name in ("bytes_per_round.png", "perplexity.png"):
        _assert_png(out / name)


@real
def test_the_summary_dept_server_prints_matches_its_metrics(real_run: RealRun) -> None:
    """The bytes-per-round table printed at exit carries the JSONL's numbers, round by round."""
    rounds = real_run.round_lines
    expected = summary_table([RoundMetrics.from_dict(r) for r in rounds])
    assert expected in real_run.server_stdout, real_run.server_stdout
    rows = [line.split() for line in expected.splitlines()[2:]]
    assert [row[0] for row in rows] == [str(r["round"]) for r in rounds]
    for row, r in zip(rows, rounds, strict=True):
        assert row[-2:] == [
            f"{r['ratios']['up_vs_full_model']:.4f}",
            f"{r['ratios']['down_vs_full_model']:.4f}",
        ]


@real
def test_cli_default_out_dir(real_run: RealRun, tmp_path: Path) -> None:
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    shutil.copy(real_run.metrics_path, metrics)  # the report goes next to it: not into the shared run
    result = CliRunner().invoke(main, [str(metrics)])
    assert result.exit_code == 0, result.output
    report = metrics.parent / "report" / "report.md"
    assert str(report) in result.output
    assert report.read_text() == render_markdown(
        load_records(metrics),
        images=["bytes_per_round.png", "perplexity.png"],
        title="DEPT run report: metrics.jsonl",
    )


@real
def test_blank_lines_and_a_torn_copy_of_the_real_file(real_run: RealRun, tmp_path: Path) -> None:
    lines = real_run.metrics_path.read_text().splitlines()
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    assert load_records(path) == real_run.lines
    path.write_text("\n".join(lines) + "\n" + lines[0][: len(lines[0]) // 2] + "\n")
    with pytest.raises(MetricsFileError, match=rf"metrics\.jsonl:{len(lines) + 1}: invalid JSON"):
        load_records(path)


def test_malformed_line_names_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"round": 0}) + "\n" + '{"round": 1, "up_payload_bytes": \n')
    with pytest.raises(MetricsFileError, match=r"bad\.jsonl:2: invalid JSON"):
        load_records(path)
    path.write_text('{"round": 0}\n[1, 2]\n')
    with pytest.raises(MetricsFileError, match=r":2: expected a JSON object"):
        load_records(path)
    path.write_text('{"variant": "spec"}\n')
    with pytest.raises(MetricsFileError, match=r":1: missing or non-integer 'round'"):
        load_records(path)


def test_missing_optional_fields_still_render(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Robustness: lines missing most fields, or with the wrong types, render as empty cells."""
    path = tmp_path / "partial.jsonl"
    records: list[dict[str, Any]] = [
        {"round": 0},
        {
            "round": 1,
            "up_payload_bytes": 2048,
            "workers": [{"worker_id": "w0"}],
            "eval": {"sw": {"loss": 5.0}},
        },
        {"round": 2, "up_payload_bytes": "oops", "ratios": {"up_vs_full_model": None}},
        {"round": 3, "ratios": "oops"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level("INFO"):
        report = write_report(path, tmp_path / "out")
    text = report.read_text()
    assert "| 0 | – | – | – | – | – | – | – | – | – | – |" in text
    assert "| 3 | – | – | – | – | – | – | – | – | – | – |" in text
    assert "| Payload bytes | 2.00 KiB (2,048 B) (1 of 4 rounds) | – |" in text
    assert "| 1 | w0 | – | – | – | – | – | – |" in text
    assert "| sw | 1 | – | – | 1 | – | – | – | – | – |" in text
    assert "## Final pull" not in text  # no final line, no section
    assert (tmp_path / "out" / "bytes_per_round.png").exists()
    assert not (tmp_path / "out" / "perplexity.png").exists()
    assert "perplexity.png" not in text
    assert "plot_skipped plot=perplexity.png" in caplog.text


def test_empty_file_renders_placeholders() -> None:
    text = render_markdown([])
    assert "No rounds recorded." in text and "No evaluations recorded." in text


def test_cli_malformed_exits_nonzero(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\nnot json\n')
    result = CliRunner().invoke(main, [str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "bad.jsonl:3: invalid JSON" in result.output
