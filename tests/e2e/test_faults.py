"""Fault injection with real processes: SIGKILLed workers and servers continue the run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.e2e.conftest import SOURCES
from tests.e2e.harness import Server, records, start_worker, wait_for, worker_digests
from tests.e2e.test_rounds import server_args, worker_args

pytestmark = pytest.mark.slow


def test_worker_killed_and_restarted_continues(global_vocab: Path, tmp_path: Path) -> None:
    # Four rounds: the kill must land before the victim's last commit, or its restart has no round
    # left to train (a kill between that commit and its progress save left it at round 2 of 3 once
    # under heavy load); the first saved round is seen well before the fourth is committed.
    server = Server(server_args("spec", global_vocab, tmp_path, rounds=4), tmp_path / "server.log")
    args = {s: worker_args(server.port, s, global_vocab, tmp_path) for s in SOURCES}
    workers = {s: start_worker(args[s], tmp_path / f"{s}.log") for s in SOURCES}
    victim = SOURCES[0]
    progress = tmp_path / f"w-{victim}" / "progress.json"
    wait_for(progress.exists, 180, "the victim's first committed round")
    saved_round = json.loads(progress.read_text())["round_idx"]
    workers[victim].send_signal(signal.SIGKILL)
    workers[victim].wait()
    workers[victim] = start_worker(args[victim], tmp_path / f"{victim}.log")
    for s, w in workers.items():
        assert w.wait(timeout=300) == 0, (tmp_path / f"{s}.log").read_text()[-3000:]
    assert server.wait() == 0, server.log.read_text()[-3000:]
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


def test_server_killed_and_resumed_loses_no_round(global_vocab: Path, tmp_path: Path) -> None:
    args = server_args("spec", global_vocab, tmp_path, rounds=3)
    server = Server(args, tmp_path / "server.log")
    port = server.port
    workers = {
        s: start_worker(worker_args(port, s, global_vocab, tmp_path), tmp_path / f"{s}.log") for s in SOURCES
    }
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: len(records(metrics)) >= 1, 180, "round 0 to close")
    server.kill()
    resumed_args = [
        a if a != "0" or i == 0 or args[i - 1] != "--port" else str(port) for i, a in enumerate(args)
    ]
    server = Server([*resumed_args, "--resume"], tmp_path / "server.log")
    for s, w in workers.items():
        assert w.wait(timeout=300) == 0, (tmp_path / f"{s}.log").read_text()[-3000:]
    assert server.wait() == 0, server.log.read_text()[-3000:]
    recs = [r for r in records(metrics) if r.get("kind") != "final"]
    assert [r["round"] for r in recs] == [0, 1, 2], "no round lost or applied twice"
    check_digests_all(recs, tmp_path)


def check_digests_all(recs: list[dict], tmp: Path) -> None:
    for source in SOURCES:
        digests = worker_digests(tmp / f"w-{source}")
        assert digests[len(recs)] == recs[-1]["body_digest"]
