"""``examples/``: a plain PyTorch model trained through dept_comm alone, as real processes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
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


def _start(args: list[str], log: Path) -> subprocess.Popen[str]:
    out = open(log, "w")  # noqa: SIM115 - the process writes it until it exits
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True, env=ENV)


def _wait_for_line(log: Path, pattern: str, proc: subprocess.Popen[str], timeout_s: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(), re.M)
        if found:
            return found
        assert proc.poll() is None, f"exited {proc.returncode} before {pattern!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.timeout(START_S + 2 * RUN_S + MARGIN_S)
def test_a_participant_killed_mid_run_continues_from_its_state_dir(tmp_path: Path) -> None:
    """kill -9 a participant of the plain example after round 1; restarted with the same name and
    --state-dir, it takes part in the rounds left, and every round counts both participants once."""
    example = [sys.executable, str(EXAMPLES / "mlp_diloco.py")]
    metrics = tmp_path / "metrics.jsonl"
    server = _start(
        [*example, "--role", "server", "--rounds", "4", "--metrics", str(metrics)], tmp_path / "server.log"
    )
    procs = [server]
    try:
        port = _wait_for_line(tmp_path / "server.log", r"listening on 127\.0\.0\.1:(\d+)", server, START_S)[1]

        def participant(name: str, log: str) -> subprocess.Popen[str]:
            args = ["--role", "participant", "--port", port, "--name", name, "--sync-every", "1500"]
            proc = _start([*example, *args, "--state-dir", str(tmp_path / name)], tmp_path / log)
            procs.append(proc)
            return proc

        w0 = participant("w0", "w0.log")
        w1 = participant("w1", "w1-first.log")
        _wait_for_line(tmp_path / "w1-first.log", r"^w1 round=1 ", w1, RUN_S)
        w1.kill()  # SIGKILL: no leave, no cleanup, mid-round 2
        w1.wait()
        again = participant("w1", "w1-again.log")
        for proc in (w0, again, server):
            assert proc.wait(timeout=RUN_S) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for proc in procs:
            proc.kill()
    again_rounds = re.findall(r"^w1 round=(\d+) ", (tmp_path / "w1-again.log").read_text(), re.M)
    assert again_rounds and int(again_rounds[0]) >= 2, again_rounds  # went on, did not start over
    assert again_rounds[-1] == "3"
    rounds = [r for r in records(metrics) if r.get("kind", "round") == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for r in rounds:  # both participants, each counted once, in every round (the same worker id for w1)
        assert r["num_workers"] == 2
        assert len({w["worker_id"] for w in r["workers"]}) == 2
    assert {w["worker_id"] for w in rounds[0]["workers"]} == {w["worker_id"] for w in rounds[-1]["workers"]}
