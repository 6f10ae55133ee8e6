"""Fault injection with real processes: SIGKILLed workers and servers continue the run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.e2e.conftest import SOURCES
from tests.e2e.harness import (
    EXIT_S,
    MARGIN_S,
    RUN_S,
    START_S,
    Server,
    describe,
    records,
    start_worker,
    wait_for,
    wait_port_free,
    wait_workers,
    worker_digests,
)
from tests.e2e.test_rounds import server_args, worker_args

pytestmark = pytest.mark.slow
PORT_S = 30.0  # a SIGKILLed server's port is bindable again


@pytest.mark.timeout(START_S + 2 * RUN_S + EXIT_S + MARGIN_S)
def test_worker_killed_and_restarted_continues(global_vocab: Path, tmp_path: Path) -> None:
    # Four rounds: the kill must land before the victim's last commit, or its restart has no round
    # left to train (a kill between that commit and its progress save left it at round 2 of 3 once
    # under heavy load); the first saved round is seen well before the fourth is committed.
    server = Server(server_args("spec", global_vocab, tmp_path, rounds=4), tmp_path / "server.log")
    args = {s: worker_args(server.port, s, global_vocab, tmp_path) for s in SOURCES}
    workers = {s: start_worker(args[s], tmp_path / f"{s}.log") for s in SOURCES}
    victim = SOURCES[0]
    progress = tmp_path / f"w-{victim}" / "progress.json"
    wait_for(
        progress.exists, RUN_S, "the victim's first committed round", alive=[server.proc, workers[victim]]
    )
    saved_round = json.loads(progress.read_text())["round_idx"]
    workers[victim].send_signal(signal.SIGKILL)
    workers[victim].wait()
    workers[victim] = start_worker(args[victim], tmp_path / f"{victim}.log")
    wait_workers(workers, RUN_S)
    assert server.wait(EXIT_S) == 0, describe()
    recs = [r for r in records(tmp_path / "metrics.jsonl") if r.get("kind") != "final"]
    summary = [(r["round"], r["num_workers"]) for r in recs]
    assert [r["round"] for r in recs] == [0, 1, 2, 3], summary
    assert all(r["num_workers"] == 2 for r in recs), (
        f"the restarted worker must count in every round: {summary}"
    )
    after = json.loads(progress.read_text())
    assert after["round_idx"] == 3 and after["round_idx"] > saved_round, (after, saved_round)
    digests = worker_digests(tmp_path / f"w-{victim}")
    assert digests[4] == recs[-1]["body_digest"]


@pytest.mark.timeout(2 * START_S + PORT_S + 2 * RUN_S + EXIT_S + MARGIN_S)
def test_server_killed_and_resumed_loses_no_round(global_vocab: Path, tmp_path: Path) -> None:
    # Enough rounds that the kill lands mid-run: a round of this tiny model takes ~0.1 s.
    rounds = 20
    args = server_args("spec", global_vocab, tmp_path, rounds=rounds)
    server = Server(args, tmp_path / "server.log")
    port = server.port
    workers = {
        s: start_worker(worker_args(port, s, global_vocab, tmp_path), tmp_path / f"{s}.log") for s in SOURCES
    }
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: len(records(metrics)) >= 1, RUN_S, "round 0 to close", alive=[server.proc])
    server.kill()
    closed = [r["round"] for r in records(metrics) if r.get("kind") != "final"]
    assert len(closed) < rounds, f"the run finished before the kill ({closed}): nothing to resume"
    # The workers keep the address, so the new server takes the same port once it can be bound.
    wait_port_free(port, PORT_S)
    resumed_args = [*args, "--resume"]
    resumed_args[resumed_args.index("--port") + 1] = str(port)
    server = Server(resumed_args, tmp_path / "server.log")
    wait_workers(workers, RUN_S)
    assert server.wait(EXIT_S) == 0, describe()
    recs = [r for r in records(metrics) if r.get("kind") != "final"]
    assert [r["round"] for r in recs] == list(range(rounds)), "no round lost or applied twice"
    check_digests_all(recs, tmp_path)


def check_digests_all(recs: list[dict], tmp: Path) -> None:
    for source in SOURCES:
        digests = worker_digests(tmp / f"w-{source}")
        assert digests[len(recs)] == recs[-1]["body_digest"]
