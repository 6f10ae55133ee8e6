"""``dept-worker --overlap``: train the next round while this round's update travels.

Off by default. Synchronously a worker pulls version v_r, trains from it, pushes, waits for the
round to close and pulls v_{r+1}: it idles for the whole exchange. With overlap, as soon as round
r's update is encoded it loads the replica it measured that update against (v_r, the *pre-push
replica*) into the model and, in a background thread, evaluates it and trains round r+1's inner
steps from it, while the main thread pushes round r's update, waits for round r to close and
pulls v_{r+1} into the replica (not into the model). Round r+1's update is then ``trained - v_r``,
sent against v_{r+1}: a one-round-delayed outer update as in Streaming DiLoCo's overlapped
communication and "eager updates". Only the encoding of the update (and the state save) stays
between two rounds' training: push, wait and pull all run beside it.

What stays as it was: every pull is applied to the replica and verified against the server's
digest, so replicas stay bit-identical; every push names the replica's version and digest, so
the server's fencing (stale rounds, duplicate commits) is unchanged; error feedback and the
codec see the update exactly as in a synchronous round. The round's validation metrics are those
of v_r, taken in the background thread before round r+1's training starts (the synchronous loop
takes the same ones at the start of round r+1). The worker's state (``--state-dir``) is saved
after the update is encoded and before the background round starts, so before the push. Any
refusal or error ends the background round (its work is dropped, after it finishes its steps)
and the next round is synchronous. Nothing is trained ahead after the run's last round, so the
final evaluation sees as many rounds of training as a synchronous run's. Only the shared body is
trained ahead: the variants whose embeddings are shared too (glob, trim) and torchrun nodes run
synchronously.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from dept_comm.names import BODY_PREFIX
from dept_model import Variant

from .view import DeptReplica

if TYPE_CHECKING:
    from .loop import Worker

logger = logging.getLogger(__name__)

OVERLAP_VARIANTS = (Variant.SPEC, Variant.SPEC_OPT)


class OverlapReplica(DeptReplica):
    """A replica that can hold pulls back from the model (while it trains) and measure the update
    from the state training started at instead of from itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = False  # pulls update the replica only; the model is training
        self.base: dict[str, torch.Tensor] | None = None  # where this round's training started

    def load_into_model(self) -> None:
        if not self.hold:
            super().load_into_model()

    def delta(self) -> dict[str, torch.Tensor]:
        if self.base is None:
            return super().delta()
        return {
            key: value.detach().to(self.device, torch.float32) - self.base[key]
            for key, value in self.dept.body().items()
        }


class _Background:
    """One round in a thread: evaluate the model as it starts, then its inner steps; ``join``
    returns (loss, tokens, metrics, train seconds) or raises what the thread raised."""

    def __init__(
        self, evaluate: Callable[[], dict[str, float]], train: Callable[[], tuple[float, int]]
    ) -> None:
        self._result: tuple[float, int, dict[str, float], float] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(evaluate, train), name="overlap-train", daemon=True
        )
        self._thread.start()

    def _run(self, evaluate: Callable[[], dict[str, float]], train: Callable[[], tuple[float, int]]) -> None:
        try:
            metrics = evaluate()
            t0 = time.monotonic()
            loss, tokens = train()
            self._result = (loss, tokens, metrics, time.monotonic() - t0)
        except BaseException as err:  # handed to the main thread by join
            self._error = err

    def join(self) -> tuple[float, int, dict[str, float], float]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class Overlap:
    """The overlapped round of one single-process ``Worker`` (see the module docstring)."""

    def __init__(self, worker: Worker) -> None:
        if worker.variant not in OVERLAP_VARIANTS:
            raise ValueError(
                f"--overlap trains the shared body ahead; variant {worker.variant} shares its "
                f"embeddings too: use {', '.join(str(v) for v in OVERLAP_VARIANTS)}"
            )
        from .loop import Worker  # (the loop imports this module)

        if type(worker) is not Worker:
            raise ValueError("--overlap runs in a single-process worker, not across a torchrun node")
        assert isinstance(worker.replica, OverlapReplica)
        self.w = worker
        self.replica: OverlapReplica = worker.replica
        self._bg: _Background | None = None
        self._started_at = 0.0

    def round(self) -> tuple[float, int, dict[str, float], float]:
        """This round's (train loss, tokens, validation metrics, train seconds): trained in the
        background since the last update was encoded when there is such a round in flight, else
        here."""
        if self._bg is None:
            self.w.pull()
            metrics = self.w.evaluate()
            t0 = time.monotonic()
            loss, tokens = self.w.train()
            return loss, tokens, metrics, time.monotonic() - t0
        self.w.pull()  # v_r into the replica while the background round still trains
        pulled = time.monotonic()
        bg, self._bg = self._bg, None
        try:
            loss, tokens, metrics, seconds = bg.join()
        finally:
            self.replica.hold = False
        self.w.last_loss = loss
        logger.info(
            "overlap round=%d trained ahead: train_s=%.2f round_s=%.2f (since the last update was "
            "encoded; waited for training %.2f s after the pull)",
            self.w.info.round_idx,
            seconds,
            time.monotonic() - self._started_at,
            time.monotonic() - pulled,
        )
        return loss, tokens, metrics, seconds

    def has_next(self, round_idx: int) -> bool:
        """Whether a round follows ``round_idx`` (none is trained ahead after the run's last)."""
        rounds = self.w.run_info.get("rounds")
        return rounds is None or round_idx + 1 < int(rounds)

    def train_ahead(self) -> None:
        """Once an update is encoded (before it is pushed): evaluate and train the next round from
        the replica it was measured against, in the background."""
        start = {k: v.clone() for k, v in self.replica.tensors.items() if k.startswith(BODY_PREFIX)}
        self.replica.base = None
        self.replica.load_into_model()  # the model back to v_r (its embeddings stay its own)
        self.replica.base = start
        self.replica.hold = True
        self._started_at = time.monotonic()
        self._bg = _Background(self.w.evaluate, self.w.train)
        logger.info(
            "overlap round=%d training ahead while round=%d travels",
            self.w.info.round_idx + 1,
            self.w.info.round_idx,
        )

    def drop(self) -> None:
        """End the background round, if any, and forget it: the next round is synchronous."""
        bg, self._bg = self._bg, None
        if bg is not None:
            try:
                bg.join()
            except Exception as err:  # its work is dropped either way
                logger.warning("background round failed: %s", err)
        self.replica.hold = False
        self.replica.base = None
