"""``dept-worker --overlap`` end to end: two real workers train each next round while the last
update travels; every round closes with both updates, every replica matches the server's body
digest after every round, and the last round's update was trained ahead (its train loss is
reported, its base is the version the server held)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.harness import (
    EXIT_S,
    MARGIN_S,
    RUN_S,
    START_S,
    Server,
    describe,
    records,
    start_worker,
    wait_workers,
    worker_digests,
)
from tests.e2e.test_rounds import SOURCES, server_args, worker_args

pytestmark = pytest.mark.slow

ROUNDS = 4


@pytest.mark.timeout(START_S + RUN_S + EXIT_S + MARGIN_S)
def test_overlapped_rounds_keep_replicas_identical(global_vocab: Path, tmp_path: Path) -> None:
    server = Server(server_args("spec", global_vocab, tmp_path, rounds=ROUNDS), tmp_path / "server.log")
    workers = {
        s: start_worker(
            worker_args(server.port, s, global_vocab, tmp_path, extra=["--overlap"]), tmp_path / f"{s}.log"
        )
        for s in SOURCES
    }
    wait_workers(workers, RUN_S)
    assert server.wait(EXIT_S) == 0, describe()
    rounds = [r for r in records(tmp_path / "metrics.jsonl") if r.get("kind") != "final"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS)), describe()
    for r in rounds:
        assert r["num_workers"] == len(SOURCES), r  # no update refused as stale: fencing agrees
        assert all(w["train_loss"] is not None for w in r["workers"]), r
    for s in SOURCES:
        digests = worker_digests(tmp_path / f"w-{s}")
        for r in rounds:
            assert digests[r["round"] + 1] == r["body_digest"], f"{s}: replica diverged at round {r['round']}"
        log = (tmp_path / f"{s}.log").read_text()
        assert "update refused" not in log and "background round failed" not in log, log[-3000:]
        # every round after the first was trained in the background while the last update travelled
        assert log.count("trained ahead") == ROUNDS - 1, log[-3000:]
        # ... and none after the last round (the final evaluation sees ROUNDS rounds of training)
        assert log.count("training ahead while") == ROUNDS - 1, log[-3000:]
        assert f"training ahead while round={ROUNDS - 1} travels" not in log, log[-3000:]
        # the per-round line dept-bench overlap reads
        assert (
            len(re.findall(r"round=\d+ source=\S+ .* train_s=[\d.]+ pull_s=[\d.]+ push_s=[\d.]+", log))
            == ROUNDS
        )


def test_overlap_is_refused_where_embeddings_are_shared(global_vocab: Path, tmp_path: Path) -> None:
    server = Server(server_args("glob", global_vocab, tmp_path, rounds=1), tmp_path / "server.log")
    worker = start_worker(
        worker_args(server.port, SOURCES[0], global_vocab, tmp_path, extra=["--overlap"]), tmp_path / "w.log"
    )
    assert worker.wait(RUN_S) != 0
    assert "--overlap trains the shared body ahead" in (tmp_path / "w.log").read_text()
    server.proc.kill()
