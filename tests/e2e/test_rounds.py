"""End to end with real processes and sockets: 2 workers x 2 rounds for each variant."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import SOURCES
from tests.e2e.harness import (
    EXIT_S,
    MARGIN_S,
    RUN_S,
    START_S,
    Server,
    records,
    start_worker,
    wait_workers,
    worker_digests,
)

pytestmark = pytest.mark.slow
# One server start, one run of the workers, the metrics scrape, the server's exit.
RUN_TIMEOUT_S = START_S + RUN_S + EXIT_S + MARGIN_S


def server_args(
    variant: str, vocab: Path, tmp: Path, rounds: int = 2, extra: list[str] | None = None
) -> list[str]:
    return [
        "--port", "0", "--rounds", str(rounds), "--workers", str(len(SOURCES)), "--variant", variant,
        "--model", "tiny", "--vocab", str(vocab), "--metrics-path", str(tmp / "metrics.jsonl"),
        "--checkpoint-dir", str(tmp / "ckpt"), "--round-timeout", "300", *(extra or []),
    ]  # fmt: skip


def worker_args(port: int, source: str, vocab: Path, tmp: Path, extra: list[str] | None = None) -> list[str]:
    return [
        "--server", f"127.0.0.1:{port}", "--source", source, "--vocab", str(vocab), "--inner-steps", "3",
        "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--state-dir", str(tmp / f"w-{source}"),
        "--device", os.environ.get("DEPT_TEST_DEVICE", "cpu"),  # cuda on a GPU host: replicas must still match
        *(extra or []),
    ]  # fmt: skip


def run_variant(variant: str, vocabs: dict[str, Path], tmp: Path) -> list[dict]:
    extra = ["--metrics-port", "0", "--linger", "30"]
    server = Server(server_args(variant, vocabs["global"], tmp, extra=extra), tmp / "server.log")
    # spec-opt: each worker brings a tokenizer trained on its own source
    vocab_of = {s: vocabs[s] if variant == "spec-opt" else vocabs["global"] for s in SOURCES}
    workers = {
        s: start_worker(worker_args(server.port, s, vocab_of[s], tmp), tmp / f"{s}.log") for s in SOURCES
    }
    wait_workers(workers, RUN_S)
    # The same figures are served in Prometheus text format (the server lingers for a final scrape).
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "dept_round_up_payload_bytes" in text and 'source="sw"' in text, text[:2000]
    server.proc.send_signal(signal.SIGTERM)  # ends the linger: a clean stop, exit 0
    assert server.wait(EXIT_S) == 0, server.log.read_text()[-3000:]
    return records(tmp / "metrics.jsonl")


def group_bytes(worker: dict, group: str) -> int:
    return int(worker.get("up_by_group", {}).get(group, {}).get("raw_bytes", 0))


def check_digests(recs: list[dict], tmp: Path) -> None:
    rounds = [r for r in recs if r.get("kind") != "final"]
    assert [r["round"] for r in rounds] == [0, 1]
    for source in SOURCES:
        digests = worker_digests(tmp / f"w-{source}")
        verified = replica_digests(tmp / f"w-{source}")
        for r in rounds:  # round r closed at body version r + 1, which every worker pulled after
            assert digests[r["round"] + 1] == r["body_digest"], f"{source} diverged at round {r['round']}"
            # Every shared tensor, not only the body: GLOB's matrix, TRIM's rows as the server holds them.
            want = r["replica_digests"][source] if r["variant"] == "trim" else r["digest"]
            assert verified[r["round"] + 1] == want, f"{source}'s shared state diverged at round {r['round']}"
        # A pull that failed its digest and fell back to a full pull means a replica diverged.
        log = (tmp / f"{source}.log").read_text()
        assert "did not verify" not in log, log[-3000:]


def replica_digests(state_dir: Path) -> dict[int, str]:
    """Each pulled version's digest over the worker's whole shared state, as it verified it."""
    rows = [json.loads(line) for line in (state_dir / "digests.jsonl").read_text().splitlines()]
    return {int(row["version"]): row["digest"] for row in rows}


@pytest.mark.timeout(RUN_TIMEOUT_S)
@pytest.mark.parametrize("variant", ["glob", "trim", "spec", "spec-opt"])
def test_two_workers_two_rounds(variant: str, vocabs: dict[str, Path], tmp_path: Path) -> None:
    recs = run_variant(variant, vocabs, tmp_path)
    check_digests(recs, tmp_path)
    rounds = [r for r in recs if r.get("kind") != "final"]
    for r in rounds:
        assert r["num_workers"] == 2 and len(r["workers"]) == 2
        assert r["up_payload_bytes"] > 0 and r["down_payload_bytes"] > 0
        for w in r["workers"]:
            body = group_bytes(w, "body")
            emb = group_bytes(w, "embeddings")
            assert body > 0
            if variant in ("spec", "spec-opt"):
                assert emb == 0, f"{variant} must never send embeddings"
            elif variant == "glob":
                assert emb == 512 * 64 * 4, "glob sends the whole embedding matrix (fp32 reference bytes)"
            else:
                # trim: only the V_k rows (n x d) plus their ids (n), at 4 reference bytes each
                assert 0 < emb < 512 * 64 * 4
                assert emb % (65 * 4) == 0
    final = [r for r in recs if r.get("kind") == "final"]
    assert final and set(final[0]["eval"]) == set(SOURCES)
    first_eval = rounds[0]["eval"]
    assert set(first_eval) == set(SOURCES) and all(v["ppl"] > 1 for v in first_eval.values())
