"""``dept-bench overlap --quick --json``: a real synchronous and a real ``--overlap`` run, each
behind its own emulated links, give the documented keys (no timing is judged here: the figures
live in benchmarks/results)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

RUN_KEYS = {
    "overlap", "rate_mbit", "rtt_ms", "codec", "rounds", "compute_s_per_round", "comm_s_per_round",
    "round_wall_s_per_round", "wall_over_compute", "avg_val_bpb", "train_s_per_round", "eval_s_per_round",
    "wall_over_train",
}  # fmt: skip


@pytest.mark.timeout(240)
def test_quick_overlap_benchmark_reports_both_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dept_bench.cli", "overlap", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    runs = result["runs"]
    assert [r["overlap"] for r in runs] == [False, True]
    for r in runs:
        assert set(r) >= RUN_KEYS, sorted(RUN_KEYS - set(r))
        assert r["rounds"] == 4 and len(r["round_wall_s"]) == 3
        for key in (
            "compute_s_per_round", "train_s_per_round", "eval_s_per_round", "comm_s_per_round",
            "round_wall_s_per_round", "avg_val_bpb",
        ):  # fmt: skip
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        for series in r["workers"].values():  # every steady-state round of every worker was read
            assert len(series["train_s"]) == len(series["eval_s"]) == len(series["comm_s"]) == 3
            assert all(x > 0 for x in series["eval_s"]), series  # the round line carries eval_s
        assert r["compute_s_per_round"] == pytest.approx(
            r["train_s_per_round"] + r["eval_s_per_round"], abs=2e-3
        )
        # every worker's traffic crossed its own emulated link, both ways
        assert len(r["link_bytes"]) == 2 and all(b["up"] > 0 and b["down"] > 0 for b in r["link_bytes"]), r
    assert math.isfinite(result["bpb_overlap_vs_sync"])
