"""``dept-local``, the README's main command, end to end: its printed tables are the metrics it wrote."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import ENV, MARGIN_S, RUN_S, START_S, records, worker_digests

pytestmark = pytest.mark.slow

SOURCES = ["sw", "en"]
LOCAL_S = START_S + RUN_S  # tokenizers, the server's start, the workers' run, the report


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _eval(value: float) -> str:
    return f"{value:.3f}"


@pytest.mark.timeout(LOCAL_S + MARGIN_S)
def test_dept_local_prints_the_metrics_it_wrote(tmp_path: Path) -> None:
    exe = shutil.which("dept-local")
    assert exe is not None, "dept-local is not installed (pip install -e .)"
    out = tmp_path / "run"
    args = [
        exe, "--variant", "spec", "--sources", ",".join(SOURCES), "--rounds", "2", "--inner-steps", "2",
        "--batch-size", "2", "--seq-len", "32", "--vocab-size", "300", "--out", str(out),
    ]  # fmt: skip
    try:
        done = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=LOCAL_S)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(
            f"dept-local still ran after {LOCAL_S:.0f} s:\n{err.stdout!r}\n{err.stderr!r}"
        ) from None
    logs = "\n".join(f"--- {p.name}:\n{p.read_text()[-2000:]}" for p in sorted((out / "logs").glob("*.log")))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-3000:]}\n{logs}"
    printed = done.stdout

    recs = records(out / "metrics.jsonl")
    rounds = [r for r in recs if r.get("kind") != "final"]
    final = next(r for r in recs if r.get("kind") == "final")
    assert [r["round"] for r in rounds] == [0, 1], printed
    assert all(r["num_workers"] == len(SOURCES) for r in rounds)

    # The bytes-per-round table: one row per round, every figure the server recorded.
    table = re.findall(r"^\s*(\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s*$", printed, re.M)
    assert len(table) == len(rounds), printed
    for row, r in zip(table, rounds, strict=True):
        rnd, up, up_raw, down, down_raw, ratio = row
        assert int(rnd) == r["round"]
        assert (_number(up), _number(up_raw)) == (r["up_payload_bytes"], r["up_raw_bytes"]), (row, r)
        assert (_number(down), _number(down_raw)) == (r["down_payload_bytes"], r["down_raw_bytes"]), (row, r)
        assert ratio == f"{r['up_payload_bytes'] / r['up_raw_bytes']:.3f}"
        # and the live progress line for the same round
        assert (
            f"round {r['round']}: up {r['up_payload_bytes']:,} B, down {r['down_payload_bytes']:,} B"
            in printed
        )

    # The validation table: before training (round 0's evaluation) -> after the last round (final).
    for source in SOURCES:
        before, after = rounds[0]["eval"][source], final["eval"][source]
        ppl = f"{_eval(before['ppl'])} -> {_eval(after['ppl'])}"
        bpb = f"{_eval(before['bits_per_byte'])} -> {_eval(after['bits_per_byte'])}"
        assert re.search(rf"^\s*{source}\s+{re.escape(ppl)}\s+{re.escape(bpb)}\s*$", printed, re.M), printed

    # Every worker's replica ended at the server's body, and the report was written where it says.
    for source in SOURCES:
        digests = worker_digests(out / "workers" / source)
        assert digests[len(rounds)] == rounds[-1]["body_digest"], source
    report = out / "report" / "report.md"
    assert f"report: {report}" in printed and report.stat().st_size > 0
