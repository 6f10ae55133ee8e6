"""One worker across two ranks under torchrun (gloo on CPU) against a real dept-server.

The node's ranks must hold bit-identical bodies after every pull (each rank writes the digest of
the body it holds to ``digests-rank{R}.jsonl``; they are compared with each other and with the
server's round digests), the server must see one worker for the source, and a node whose rank was
SIGKILLed must continue from its state when restarted.

On a GPU host: ``DEPT_TEST_DEVICE=cuda`` runs the ranks on CUDA with NCCL, ``DEPT_TEST_RANKS``
sets how many ranks (at most the number of GPUs: NCCL refuses two ranks on one GPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dept_model.state import load_state
from tests.e2e.harness import ENV, Server, records, start_worker, wait_for, worker_digests
from tests.e2e.test_rounds import server_args

pytestmark = pytest.mark.slow

RANKS = int(os.environ.get("DEPT_TEST_RANKS", "2"))
DEVICE = os.environ.get("DEPT_TEST_DEVICE", "cpu")
INNER_STEPS, BATCH = 2, 2
NODE_SOURCE, OTHER_SOURCE = "sw", "en"


def worker_args(port: int, source: str, vocab: Path, tmp: Path) -> list[str]:
    return [
        "--server", f"127.0.0.1:{port}", "--source", source, "--vocab", str(vocab),
        "--inner-steps", str(INNER_STEPS), "--batch-size", str(BATCH), "--seq-len", "32",
        "--eval-batches", "1", "--state-dir", str(tmp / f"w-{source}"), "--device", DEVICE,
    ]  # fmt: skip


@pytest.fixture
def nodes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """torchrun jobs started by a test, each in its own session: the whole group is killed after."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        proc.wait()


def start_node(
    started: list[subprocess.Popen[bytes]], args: list[str], log: Path, *, via_cli: bool = False
) -> subprocess.Popen[bytes]:
    """``python -m torch.distributed.run ... -m dept_worker.cli ARGS``, or (``via_cli``) the same
    job launched by ``python -m dept_worker.cli --nproc-per-node N ARGS``."""
    if via_cli:
        command = [sys.executable, "-m", "dept_worker.cli", "--nproc-per-node", str(RANKS), *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
            "-m", "dept_worker.cli", *args,
        ]  # fmt: skip
    f = open(log, "a")  # noqa: SIM115 (inherited by the child; closed with the test process)
    proc = subprocess.Popen(command, stdout=f, stderr=f, env=ENV, start_new_session=True)
    started.append(proc)
    return proc


def rank_pid(node: subprocess.Popen[bytes], rank: int) -> int:
    """The pid of the node's process with RANK=``rank`` (a descendant of the torchrun process)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    family, grew = {node.pid}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in family} - family
        family |= children
        grew = bool(children)
    for pid in family - {node.pid}:
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no process with RANK={rank} under torchrun pid {node.pid}")


def rank_rows(state_dir: Path) -> list[list[dict[str, Any]]]:
    """Each rank's (version, body digest) rows, one list per rank."""
    return [records(state_dir / f"digests-rank{r}.jsonl") for r in range(RANKS)]


def served(position: dict[str, int]) -> int:
    """Windows a rank's batch stream has served since its start (over all epochs)."""
    return position["epoch"] * position["num_windows"] + position["position"]


def node_progress(state_dir: Path) -> tuple[int, list[int], int]:
    """(saved round, windows served by each rank, trainer step) from the node's saved state."""
    progress = json.loads((state_dir / "progress.json").read_text())
    assert progress["data"]["world_size"] == RANKS
    step = int(load_state(state_dir / f"trainer-{progress['tag']}.safetensors")["step"])
    return progress["round_idx"], [served(p) for p in progress["data"]["ranks"]], step


def check_rounds(recs: list[dict[str, Any]], num_rounds: int, state_dir: Path) -> None:
    """Every round counted the node as one worker; every rank holds the server's body after it."""
    rounds = [r for r in recs if r.get("kind") != "final"]
    assert [r["round"] for r in rounds] == list(range(num_rounds))
    for r in rounds:
        sources = sorted(w["source"] for w in r["workers"])
        assert r["num_workers"] == 2 and sources == sorted([NODE_SOURCE, OTHER_SOURCE]), (r["round"], sources)
    rows = rank_rows(state_dir)
    assert rows[0], "rank 0 recorded no pulled body"
    for r in range(1, RANKS):
        assert rows[r] == rows[0], f"rank {r} holds another body than rank 0"
    held = {int(row["version"]): row["body_digest"] for row in rows[0]}
    assert held == worker_digests(state_dir), "the model's body differs from rank 0's verified replica"
    for r in rounds:  # round r closed at body version r + 1, which every rank pulled after it
        assert held[r["round"] + 1] == r["body_digest"], f"the node diverged at round {r['round']}"


@pytest.mark.timeout(420)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_node_trains_two_rounds_as_one_worker(
    parallel: str, vocabs: dict[str, Path], tmp_path: Path, nodes: list[subprocess.Popen[bytes]]
) -> None:
    server = Server(server_args("trim", vocabs["global"], tmp_path, rounds=2), tmp_path / "server.log")
    state_dir = tmp_path / f"w-{NODE_SOURCE}"
    node_log = tmp_path / "node.log"
    args = [*worker_args(server.port, NODE_SOURCE, vocabs["global"], tmp_path), "--parallel", parallel]
    node = start_node(nodes, args, node_log)
    other = start_worker(
        worker_args(server.port, OTHER_SOURCE, vocabs["global"], tmp_path), tmp_path / "other.log"
    )
    assert node.wait(timeout=300) == 0, node_log.read_text()[-4000:]
    assert other.wait(timeout=120) == 0, (tmp_path / "other.log").read_text()[-3000:]
    assert server.wait() == 0, server.log.read_text()[-3000:]
    recs = records(tmp_path / "metrics.jsonl")
    check_rounds(recs, 2, state_dir)
    assert [int(row["version"]) for row in rank_rows(state_dir)[0]] == [0, 1, 2]
    saved_round, windows, step = node_progress(state_dir)
    assert saved_round == 1 and step == 2 * INNER_STEPS
    assert windows == [2 * INNER_STEPS * BATCH] * RANKS, "each rank reads its own batches at every step"
    text = node_log.read_text()
    assert f"world_size={RANKS}" in text and text.count("finished source=sw") == 1, text[-3000:]
    assert text.count(f"trains {parallel} model=tiny") == RANKS


def unbroken_digests(
    started: list[subprocess.Popen[bytes]], vocab: Path, tmp: Path, parallel: str, rounds: int
) -> list[str]:
    """The body digest after each round of the same run without a kill."""
    tmp.mkdir()
    server = Server(server_args("spec", vocab, tmp, rounds=rounds), tmp / "server.log")
    args = [*worker_args(server.port, NODE_SOURCE, vocab, tmp), "--parallel", parallel]
    node = start_node(started, args, tmp / "node.log")
    other = start_worker(worker_args(server.port, OTHER_SOURCE, vocab, tmp), tmp / "other.log")
    assert node.wait(timeout=300) == 0, (tmp / "node.log").read_text()[-4000:]
    assert other.wait(timeout=120) == 0 and server.wait() == 0
    return [r["body_digest"] for r in records(tmp / "metrics.jsonl") if r.get("kind") != "final"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_node_killed_rank_restarts_from_its_state(
    parallel: str, vocabs: dict[str, Path], tmp_path: Path, nodes: list[subprocess.Popen[bytes]]
) -> None:
    rounds = 3
    server = Server(server_args("spec", vocabs["global"], tmp_path, rounds=rounds), tmp_path / "server.log")
    state_dir = tmp_path / f"w-{NODE_SOURCE}"
    node_log = tmp_path / "node.log"
    args = [*worker_args(server.port, NODE_SOURCE, vocabs["global"], tmp_path), "--parallel", parallel]
    node = start_node(nodes, args, node_log)
    # Round 0 cannot close before the second worker joins: once the node saved its round-0 state
    # it waits for the round with every rank alive, and one of them is killed there.
    wait_for((state_dir / "progress.json").exists, 240, "the node's round-0 state")
    os.kill(rank_pid(node, RANKS - 1), signal.SIGKILL)
    assert node.wait(timeout=120) != 0, "torchrun must fail when one of its ranks is killed"
    killed_round, killed_windows, killed_step = node_progress(state_dir)
    assert killed_round == 0 and killed_step == INNER_STEPS
    assert killed_windows == [INNER_STEPS * BATCH] * RANKS

    node = start_node(nodes, args, node_log, via_cli=RANKS > 1)  # dept-worker runs one rank itself
    other = start_worker(
        worker_args(server.port, OTHER_SOURCE, vocabs["global"], tmp_path), tmp_path / "other.log"
    )
    assert node.wait(timeout=300) == 0, node_log.read_text()[-4000:]
    assert other.wait(timeout=120) == 0, (tmp_path / "other.log").read_text()[-3000:]
    assert server.wait() == 0, server.log.read_text()[-3000:]
    check_rounds(records(tmp_path / "metrics.jsonl"), rounds, state_dir)
    saved_round, windows, step = node_progress(state_dir)
    # It continued: the rounds it had left, from the saved step and data positions (a node that
    # started afresh would end at (rounds - 1) * INNER_STEPS steps and as many batches).
    assert saved_round == rounds - 1 and step == rounds * INNER_STEPS
    assert windows == [rounds * INNER_STEPS * BATCH] * RANKS
    assert "restored worker state round=0" in node_log.read_text()
    if DEVICE == "cpu":  # deterministic here (CUDA kernels with atomics are not): bit for bit where
        # an unbroken run lands, so the optimizer state, residuals and data positions all continued
        broken = [r["body_digest"] for r in records(tmp_path / "metrics.jsonl") if r.get("kind") != "final"]
        assert unbroken_digests(nodes, vocabs["global"], tmp_path / "unbroken", parallel, rounds) == broken


@pytest.mark.timeout(300)
@pytest.mark.skipif(RANKS < 2, reason="needs a rank besides rank 0")
def test_torchrun_ranks_give_up_on_a_silent_rank_0(
    vocabs: dict[str, Path], tmp_path: Path, nodes: list[subprocess.Popen[bytes]]
) -> None:
    server = Server(server_args("spec", vocabs["global"], tmp_path, rounds=2), tmp_path / "server.log")
    state_dir = tmp_path / f"w-{NODE_SOURCE}"
    node_log = tmp_path / "node.log"
    args = [*worker_args(server.port, NODE_SOURCE, vocabs["global"], tmp_path), "--dist-timeout", "10"]
    node = start_node(nodes, args, node_log)
    wait_for((state_dir / "progress.json").exists, 240, "the node's round-0 state")
    leader = rank_pid(node, 0)
    os.kill(leader, signal.SIGSTOP)  # hung: no command, no sign of life, and torchrun sees it running
    try:
        wait_for(lambda: "no sign of life" in node_log.read_text(), 120, "the other ranks to give up")
    finally:
        os.kill(leader, signal.SIGCONT)  # let it take torchrun's SIGTERM
    assert node.wait(timeout=120) != 0
    server.kill()
