"""dept-worker on SIGTERM in the middle of a push: it leaves, and the server counts nothing from it.

The victim talks to the server through a proxy that lets its uploads through at 32 KiB/s, so its
fp32 body upload (~400 KB for the tiny model) takes ~12 s; the signal goes once the proxy has
forwarded part of it. The documented behaviour (worker/signals.py, ``dept-worker --help``): the
upload is cancelled uncommitted, Leave(reason "terminated") is sent, exit status 128 + 15 = 143.
With ``--workers 2 --min-workers 1`` the round then closes with the other worker's update alone.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from dept_comm.rounds import worker_id_for
from tests.e2e.harness import (
    EXIT_S,
    MARGIN_S,
    RUN_S,
    START_S,
    Server,
    describe,
    records,
    start_worker,
    throttled_proxy,
    wait_exit,
    wait_for,
    wait_workers,
    worker_digests,
)
from tests.e2e.test_rounds import server_args, worker_args

pytestmark = pytest.mark.slow

UP_RATE = 32 * 1024  # bytes/s through the victim's proxy, client to server
UNDER_WAY = 96 * 1024  # forwarded bytes that only the upload can account for (join and pull are < 8 KiB)
SIGTERM_EXIT = 128 + signal.SIGTERM


@pytest.mark.timeout(START_S + 2 * RUN_S + 2 * EXIT_S + MARGIN_S)
def test_sigterm_mid_push_leaves_and_counts_nothing(global_vocab: Path, tmp_path: Path) -> None:
    args = server_args(
        "spec", global_vocab, tmp_path, rounds=1, extra=["--min-workers", "1", "--codec-up", "fp32"]
    )
    # The round closes when the victim leaves (every live worker committed), not at a deadline.
    args[args.index("--round-timeout") + 1] = "150"
    server = Server(args, tmp_path / "server.log")
    survivor, victim = "sw", "en"
    with throttled_proxy(server.port, UP_RATE) as proxy:
        other = start_worker(worker_args(server.port, survivor, global_vocab, tmp_path), tmp_path / "sw.log")
        proc = start_worker(worker_args(proxy.port, victim, global_vocab, tmp_path), tmp_path / "en.log")
        wait_for(
            lambda: proxy.counts.up >= UNDER_WAY,
            RUN_S,
            "the victim's upload to be under way",
            alive=[server.proc, proc],
        )
        forwarded_at_signal = proxy.counts.up
        proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, EXIT_S, "the SIGTERMed worker to exit") == SIGTERM_EXIT, describe()
        wait_workers({survivor: other}, RUN_S)
        assert server.wait(EXIT_S) == 0, describe()

    server_log = server.log.read_text()
    victim_id, survivor_id = worker_id_for(victim), worker_id_for(survivor)
    assert f"leave worker={victim_id} reason=terminated" in server_log, describe()
    # The server held part of the upload (an open upload of round 0) and dropped it on the leave.
    assert f"worker={victim_id} round=0 why=left" in server_log, describe()
    assert f"commit worker={victim_id}" not in server_log, "the terminated worker's upload was committed"
    assert f"commit worker={survivor_id} round=0" in server_log
    victim_log = (tmp_path / "en.log").read_text()
    assert "stopped by SIGTERM" in victim_log and "exit status 143" in victim_log, victim_log[-3000:]

    rounds = [r for r in records(tmp_path / "metrics.jsonl") if r.get("kind") != "final"]
    assert [(r["round"], r["num_workers"]) for r in rounds] == [(0, 1)], describe()
    (rec,) = rounds
    by_source = {w["source"]: w for w in rec["workers"]}
    # The premise: the signal came while the upload was still streaming (less than one fp32 body
    # had crossed the proxy; the survivor's record shows what a whole fp32 body upload is).
    whole_upload = by_source[survivor]["up_by_group"]["body"]["payload_bytes"]
    assert forwarded_at_signal < whole_upload, (forwarded_at_signal, whole_upload)
    # Nothing of the victim's counts: no loss, no evaluation, only the survivor's update applied.
    assert by_source.get(victim, {}).get("train_loss") is None, rec
    assert set(rec["eval"]) == {survivor}, rec["eval"]
    assert worker_digests(tmp_path / f"w-{survivor}")[1] == rec["body_digest"]


@pytest.mark.timeout(START_S + RUN_S + 3 * EXIT_S + MARGIN_S)
def test_sigint_while_waiting_for_the_round_leaves_with_130(global_vocab: Path, tmp_path: Path) -> None:
    # Two workers expected, one comes: after its commit it waits (long polls) for a round that
    # cannot close; SIGINT then stops it there.
    server = Server(server_args("spec", global_vocab, tmp_path, rounds=1), tmp_path / "server.log")
    proc = start_worker(worker_args(server.port, "sw", global_vocab, tmp_path), tmp_path / "sw.log")
    worker_id = worker_id_for("sw")
    wait_for(
        lambda: f"commit worker={worker_id} round=0" in server.log.read_text(),
        RUN_S,
        "the worker's commit of round 0",
        alive=[server.proc, proc],
    )
    proc.send_signal(signal.SIGINT)
    assert wait_exit(proc, EXIT_S, "the SIGINTed worker to exit") == 128 + signal.SIGINT, describe()
    assert "stopped by SIGINT" in (tmp_path / "sw.log").read_text(), describe()
    wait_for(
        lambda: f"leave worker={worker_id} reason=terminated" in server.log.read_text(),
        EXIT_S,
        "the server to log the worker's leave",
        alive=[server.proc],
    )
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(EXIT_S) == 0, describe()
