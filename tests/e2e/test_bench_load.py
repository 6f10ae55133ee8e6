"""dept-bench load --quick: the load benchmark's simulated workers go through the server's real
session, stream-slot and commit paths (the benchmark stalled silently once when they did not)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 300


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_quick_load_run_folds_every_update_and_reports_memory() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dept_bench.cli", "load", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = json.loads(proc.stdout)["runs"]
    assert runs
    for run in runs:
        assert run["errors"] == [], run["errors"]
        assert run["folded"] == run["expected_folds"] == run["workers"] * run["rounds"]
        assert run["server_peak_rss_mib"] >= run["server_idle_rss_mib"] > 0
        assert run["push_MBps"] > 0 and run["pull_MBps"] > 0
