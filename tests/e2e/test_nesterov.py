"""Nesterov outer steps end to end, and their momentum across a SIGKILLed server and ``--resume``.

With ``--codec-down fp32`` the down-link is lossless, so the body's change in a round is the outer
update ``u`` itself. The server checkpoints, per round, the body and the optimizer's state
(``buf.<name>`` momentum, ``lr``, ``momentum``, ``num_steps``; dept_comm/outer.py). Nesterov does

    m' = mu * m + g          u = -lr * (g + mu * m')        (g = -mean delta, unknown here)

so ``u = -lr * ((1 + mu) * m' - mu * m)`` ties three checkpointed things together: the update of a
round, the momentum before it and the momentum after it. The test kills the server once a round's
checkpoint exists, resumes it, and checks that identity for the first round the resumed server
closes, using the momentum the killed server saved. A resume that restarted the momentum from zero
would have ``m' = g`` and ``u = -lr * (1 + mu) * m'``: off by ``lr * mu * m``, which the test
requires to be far above the float rounding it tolerates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dept_comm.checkpoint import Checkpoint, CheckpointStore
from dept_comm.names import BODY_PREFIX
from dept_comm.outer import BUF_PREFIX, STEPS_KEY
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
    wait_for,
    wait_port_free,
    wait_workers,
    worker_digests,
)
from tests.e2e.test_rounds import server_args, worker_args

pytestmark = pytest.mark.slow

LR, MU = 0.5, 0.8  # not the defaults: the saved hyperparameters must be these
ROUNDS = 4
KILL_AFTER_STEP = 2  # the checkpoint written when round 1 closed
REL_TOL = 1e-3  # fp32 rounding of body + u and of the momentum update, relative to |u|
PORT_S = 30.0
# The worker's uploads (~100 KB in int8) go through a proxy at this rate: ~3 s per round, so the
# kill (polled every 50 ms) lands in the round after the awaited checkpoint, not rounds later.
UP_RATE = 32 * 1024


def load_steps(directory: Path) -> dict[int, Checkpoint]:
    with CheckpointStore(directory) as store:
        return {step: store.load(step) for step in store.steps()}


def snapshot(ckpt: Path, dest: Path) -> dict[int, Checkpoint]:
    """The checkpoints as they are now (a copy, so that the store's lock does not get in the way)."""
    shutil.copytree(ckpt, dest, ignore=shutil.ignore_patterns(".lock"))
    return load_steps(dest)


def body(c: Checkpoint) -> dict[str, torch.Tensor]:
    return {k: v for k, v in c.tensors["shared"].items() if k.startswith(BODY_PREFIX)}


def momentum(c: Checkpoint) -> dict[str, torch.Tensor]:
    return {k[len(BUF_PREFIX) :]: v for k, v in c.tensors["outer"].items() if k.startswith(BUF_PREFIX)}


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors."""
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in b) ** 0.5
    den = sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5
    return num / den


def check_nesterov_step(before: Checkpoint, after: Checkpoint, what: str) -> None:
    """The body's change from ``before`` to ``after`` is the Nesterov update their momenta imply."""
    assert after.meta["version"] == before.meta["version"] + 1, (what, before.meta, after.meta)
    b0, b1, m0, m1 = body(before), body(after), momentum(before), momentum(after)
    assert set(m1) == set(b1) and set(m0) == set(b0), (what, sorted(m0), sorted(m1))
    applied = {k: b1[k].double() - b0[k].double() for k in b1}
    predicted = {k: -LR * ((1 + MU) * m1[k].double() - MU * m0[k].double()) for k in b1}
    reset = {k: -LR * (1 + MU) * m1[k].double() for k in b1}  # what a momentum restarted at 0 gives
    err = rel(predicted, applied)
    assert err < REL_TOL, (
        f"{what}: the applied update is {err:.2e} away from Nesterov's with the saved momentum"
    )
    # The check can tell: the saved momentum moves the prediction far beyond the tolerance.
    assert rel(reset, applied) > 100 * REL_TOL, f"{what}: momentum too small to tell a reset apart"
    assert int(after.tensors["outer"][STEPS_KEY]) == int(before.tensors["outer"][STEPS_KEY]) + 1, what


@pytest.mark.timeout(START_S + RUN_S + PORT_S + START_S + RUN_S + EXIT_S + MARGIN_S)
def test_nesterov_momentum_survives_kill_and_resume(global_vocab: Path, tmp_path: Path) -> None:
    outer = [
        "--outer",
        "nesterov",
        "--outer-lr",
        str(LR),
        "--outer-momentum",
        str(MU),
        "--codec-down",
        "fp32",
    ]
    args = server_args("spec", global_vocab, tmp_path, rounds=ROUNDS, extra=outer)
    args[args.index("--workers") + 1] = "1"
    ckpt = tmp_path / "ckpt"
    server = Server(args, tmp_path / "server.log")
    port = server.port
    proxy = throttled_proxy(port, UP_RATE)
    worker = start_worker(worker_args(proxy.port, "sw", global_vocab, tmp_path), tmp_path / "sw.log")
    manifest = ckpt / f"step-{KILL_AFTER_STEP:08d}" / "manifest.json"
    wait_for(
        manifest.exists, RUN_S, f"checkpoint step {KILL_AFTER_STEP}", alive=[server.proc, worker], poll_s=0.05
    )
    server.kill()
    saved = snapshot(ckpt, tmp_path / "before-kill")
    last = max(saved)  # what --resume loads: KILL_AFTER_STEP, or the next if a round closed meanwhile
    assert KILL_AFTER_STEP <= last < ROUNDS, f"no round left after the kill: steps {sorted(saved)}"
    assert saved[last].tensors["outer"]["momentum"].item() == pytest.approx(MU)
    assert saved[last].tensors["outer"]["lr"].item() == pytest.approx(LR)
    # The same identity holds for a round the first server closed (reads and formula are right).
    check_nesterov_step(saved[last - 1], saved[last], f"round {last - 1}, before the kill")

    wait_port_free(port, PORT_S)  # the proxy keeps the address: the new server takes the same port
    resumed = [*args, "--resume"]
    resumed[resumed.index("--port") + 1] = str(port)
    with proxy:
        server = Server(resumed, tmp_path / "server.log")
        wait_workers({"sw": worker}, RUN_S)
        assert server.wait(EXIT_S) == 0, describe()

    after = load_steps(ckpt)
    assert last + 1 in after, f"the resumed server's first round left no checkpoint: steps {sorted(after)}"
    check_nesterov_step(saved[last], after[last + 1], f"round {last}, the first after --resume")

    rounds = [r for r in records(tmp_path / "metrics.jsonl") if r.get("kind") != "final"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS)), "no round lost or applied twice"
    digests = worker_digests(tmp_path / "w-sw")
    assert digests[ROUNDS] == rounds[-1]["body_digest"], "the worker's replica ends at the server's body"
