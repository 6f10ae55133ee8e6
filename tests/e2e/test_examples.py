"""``examples/``: a plain PyTorch model trained through dept_comm alone, as real processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import ENV, MARGIN_S, RUN_S, START_S, records

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MAX_USER_LINES = 120  # the bound on what a user writes to train DiLoCo-style


def test_the_mlp_example_is_at_most_120_lines() -> None:
    assert len((EXAMPLES / "mlp_diloco.py").read_text().splitlines()) <= MAX_USER_LINES


@pytest.mark.timeout(START_S + RUN_S + MARGIN_S)
def test_mlp_example_trains_two_participants_for_three_rounds(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    args = [sys.executable, str(EXAMPLES / "mlp_diloco.py"), "--rounds", "3", "--metrics", str(metrics)]
    done = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=START_S + RUN_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Each participant prints its mean inner-step loss per round: it falls from the first to the last.
    for name in ("w0", "w1"):
        losses = [float(x) for x in re.findall(rf"^{name} round=\d+ loss=([0-9.]+)$", done.stdout, re.M)]
        assert len(losses) == 3, done.stdout
        assert losses[-1] < 0.5 * losses[0], (name, losses)
    # The server's metrics: three rounds of two workers, bytes each way, and the example's summary.
    rounds = [r for r in records(metrics) if r.get("kind", "round") == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert r["num_workers"] == 2
        assert r["up_payload_bytes"] > 0 and r["down_payload_bytes"] > 0
        printed = f"server round={r['round']} workers=2 up_bytes={r['up_payload_bytes']} "
        assert printed in done.stdout
    # int8 up: about a quarter of the fp32 size of what two workers send (plus framing).
    fp32 = 4 * sum(n for n in (8 * 64 + 64, 64 * 64 + 64, 64 + 1))
    assert rounds[-1]["up_payload_bytes"] < 0.35 * 2 * fp32
