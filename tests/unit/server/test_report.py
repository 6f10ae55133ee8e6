"""dept-report: Markdown tables, PNG plots, malformed input and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dept_server.report import MetricsFileError, load_records, main, render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FULL_FP32 = 4 * 1024 * 1024


def _worker(worker_id: str, round_idx: int) -> dict:
    return {
        "worker_id": worker_id,
        "source": worker_id,
        "up_raw_bytes": 1_000_000,
        "up_payload_bytes": 250_000 + round_idx,
        "down_raw_bytes": 1_000_000,
        "down_payload_bytes": 500_000,
        "train_loss": 5.0 - round_idx / 10,
        "up_by_group": {"body": {"raw_bytes": 1_000_000, "payload_bytes": 250_000, "messages": 1}},
    }


def _round(round_idx: int) -> dict:
    workers = [_worker("sw", round_idx), _worker("en", round_idx)]
    up_payload = sum(w["up_payload_bytes"] for w in workers)
    return {
        "round": round_idx,
        "variant": "spec",
        "num_workers": 2,
        "duration_s": 10.0 + round_idx,
        "up_raw_bytes": 2_000_000,
        "up_payload_bytes": up_payload,
        "down_raw_bytes": 2_000_000,
        "down_payload_bytes": 1_000_000,
        "body_digest": "ab" * 16,
        "full_model_fp32_bytes": FULL_FP32,
        "uncompressed_body_bytes": 1_000_000,
        "ratio_up_vs_full_fp32": up_payload / FULL_FP32,
        "ratio_down_vs_full_fp32": 1_000_000 / FULL_FP32,
        "ratio_up_vs_uncompressed": up_payload / 2_000_000,
        "ratio_down_vs_uncompressed": 0.5,
        "workers": workers,
        "eval": {
            "sw": {
                "loss": 6.0 - round_idx,
                "ppl": 400.0 - 100 * round_idx,
                "bits_per_byte": 3.2 - round_idx / 10,
            },
            "en": {
                "loss": 5.0 - round_idx,
                "ppl": 150.0 - 10 * round_idx,
                "bits_per_byte": 2.5 - round_idx / 10,
            },
        },
        "some_future_field": [1, 2, 3],
    }


FINAL = {  # as server/app.py writes it: round = config.rounds, after the last round index
    "round": 3,
    "kind": "final",
    "up_payload_bytes": 0,
    "eval": {
        "sw": {"loss": 3.9, "ppl": 123.45, "bits_per_byte": 2.75},
        "en": {"loss": 4.0, "ppl": 98.76, "bits_per_byte": 2.125},
    },
}


@pytest.fixture
def metrics_path(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    lines = [json.dumps(_round(i)) for i in range(3)] + ["", json.dumps(FINAL)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000


def test_write_report_totals_perplexity_and_plots(metrics_path: Path, tmp_path: Path) -> None:
    report = write_report(metrics_path, tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text()

    # Totals: up payload = 3 rounds x 2 workers x 250,000 + 2 x (0 + 1 + 2); final line has no bytes.
    assert "Rounds: 3; duration: 33.0 s total, 11.0 s mean" in text
    assert "| Payload bytes | 1.43 MiB (1,500,006 B) | 2.86 MiB (3,000,000 B) |" in text
    assert "| Raw bytes | 5.72 MiB (6,000,000 B) | 5.72 MiB (6,000,000 B) |" in text
    assert "| Payload / raw | 0.25 | 0.5 |" in text
    # Per round: round 1 up payload, exact bytes alongside human units, ratio vs full fp32 model.
    assert "| 1 | 2 | 488.28 KiB (500,002 B) | 976.56 KiB (1,000,000 B) |" in text
    assert f"| {500_002 / FULL_FP32:.3g} |" in text
    assert "(final)" not in text  # the final line carries no bytes
    # Per worker rows.
    assert "| 2 | en | en | 244.14 KiB (250,002 B) |" in text
    assert "| 4.8000 |" in text
    # Perplexity: first round 0, last round 2, final.
    assert "| en | 0 | 150.00 | 2.5000 | 2 | 130.00 | 2.3000 | 3 | 98.76 | 2.1250 |" in text
    assert "| sw | 0 | 400.00 | 3.2000 | 2 | 200.00 | 3.0000 | 3 | 123.45 | 2.7500 |" in text
    # Plots embedded with relative links, and valid PNGs.
    assert "(bytes_per_round.png)" in text and "(perplexity.png)" in text
    for name in ("bytes_per_round.png", "perplexity.png"):
        _assert_png(tmp_path / "out" / name)


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
    path = tmp_path / "partial.jsonl"
    records = [
        {"round": 0},
        {
            "round": 1,
            "up_payload_bytes": 2048,
            "workers": [{"worker_id": "w0"}],
            "eval": {"sw": {"loss": 5.0}},
        },
        {"round": 2, "up_payload_bytes": "oops", "ratio_up_vs_full_fp32": None},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level("INFO"):
        report = write_report(path, tmp_path / "out")
    text = report.read_text()
    assert "| 0 | – | – | – | – | – | – | – | – | – | – |" in text
    assert "| Payload bytes | 2.00 KiB (2,048 B) (1 of 3 rounds) | – |" in text
    assert "| 1 | w0 | – | – | – | – | – | – |" in text
    assert "| sw | 1 | – | – | 1 | – | – | – | – | – |" in text
    assert (tmp_path / "out" / "bytes_per_round.png").exists()
    assert not (tmp_path / "out" / "perplexity.png").exists()
    assert "perplexity.png" not in text
    assert "plot_skipped plot=perplexity.png" in caplog.text


def test_empty_file_renders_placeholders() -> None:
    text = render_markdown([])
    assert "No rounds recorded." in text and "No evaluations recorded." in text


def test_cli_default_out_dir(metrics_path: Path) -> None:
    result = CliRunner().invoke(main, [str(metrics_path)])
    assert result.exit_code == 0, result.output
    report = metrics_path.parent / "report" / "report.md"
    assert str(report) in result.output
    assert report.exists()


def test_cli_malformed_exits_nonzero(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\nnot json\n')
    result = CliRunner().invoke(main, [str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "bad.jsonl:3: invalid JSON" in result.output
