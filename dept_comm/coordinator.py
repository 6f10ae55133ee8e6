"""RoundCoordinator: membership, round fencing, upload bookkeeping and round closing; pure Python, thread-safe.

Rules (RELIABILITY.md P3, P4, P6, P7, P9):

- Rounds. ``round_idx`` is the fencing token and only grows. A round ends either *closed* (the
  server applied an outer step: ``version`` + 1) or *abandoned* (below quorum at the deadline:
  the model is unchanged, ``version`` stays, and the next round opens with ``round_idx`` + 1 so
  that anything staged for the abandoned round is fenced out). The run is finished once
  ``num_rounds`` outer steps were applied (abandoned rounds do not count).
- Members. A round's members are the workers admitted to it: every live worker when it opens,
  plus joiners while the round has room (fewer than ``expected_workers`` live members), its
  deadline has not passed and it is not closing (every live member committed); other joiners wait
  for the next round, which admits every live worker. At most ``max_workers`` workers are live at
  once; a further join is refused (``MembershipFullError``). A worker silent for
  ``heartbeat_timeout_s`` (or one that called ``leave``) is offline and drops out of the set the
  round waits for; a committed contribution stays counted.
- Closing. ``ready_to_close`` is true when at least ``min_workers`` committed and either every
  live member committed, or the deadline passed. Early closing also needs ``expected_workers``
  workers to have registered once, so that the first rounds wait for slow starters (until the
  deadline) while a worker that died later is not waited for. The deadline is
  ``round_timeout_s`` after the round got its first member (an empty round never times out).
- Uploads. At most one open upload per worker; a new one supersedes the old. ``commit`` is
  idempotent per ``(worker, round)``. Uploads that can never count (superseded, expired after
  ``upload_ttl_s`` without activity, or left open when their round ended) are queued for
  :meth:`RoundCoordinator.take_dropped_uploads` so the server can free their staging.

The server must make "fold this contribution" and ``commit`` atomic with respect to
``close_round`` (one lock on its side), or fold at close from :meth:`RoundCoordinator.round_record`.
Deadlines and ``now`` are in the injected clock's seconds (``time.time`` by default, so a deadline
is a Unix time).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dept_comm.errors import (
    ConflictError,
    InvalidInputError,
    MembershipFullError,
    NotFoundError,
    PermissionDeniedError,
    RoundNotOpenError,
    RunFinishedError,
    StaleRoundError,
)
from dept_comm.rounds import (
    CommitInfo,
    CoordinatorConfig,
    RoundRecord,
    RoundState,
    RunState,
    WorkerInfo,
    worker_id_for,
)

__all__ = [
    "CommitInfo",
    "CoordinatorConfig",
    "RoundCoordinator",
    "RoundRecord",
    "RoundState",
    "RunState",
    "WorkerInfo",
    "worker_id_for",
]

logger = logging.getLogger(__name__)

HISTORY_ROUNDS = 16  # closed rounds kept for commit replays and metrics


@dataclass(slots=True)
class _Worker:
    worker_id: str
    name: str
    source_id: str
    variant: str
    vocab_digest: str
    last_seen: float
    online: bool = True
    left: bool = False


@dataclass(slots=True)
class _Upload:
    upload_id: str
    worker_id: str
    round_idx: int
    last_active: float


@dataclass(slots=True)
class _Round:
    round_idx: int
    base_version: int
    opened_at: float
    deadline: float | None
    members: set[str] = field(default_factory=set)
    commits: dict[str, CommitInfo] = field(default_factory=dict)
    outcome: str = "open"
    ended_at: float | None = None


class RoundCoordinator:
    """Round state shared by the servicer threads, guarded by one lock.

    Args:
        config: the round policy.
        now: the clock (seconds); injectable so that tests never sleep.
    """

    def __init__(self, config: CoordinatorConfig, *, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self._now = now
        self._cond = threading.Condition(threading.Lock())
        self._workers: dict[str, _Worker] = {}
        self._uploads: dict[str, _Upload] = {}  # open (begun, not committed) uploads by id
        self._dropped: list[str] = []
        self._dropped_ids: set[str] = set()  # superseded or expired in the current round
        self._nonce = secrets.token_hex(4)  # generated upload ids differ across server restarts
        self._seq = 0
        self._version = 0
        self._digest = b""
        self._finished = False
        self._round = _Round(round_idx=0, base_version=0, opened_at=now(), deadline=None)
        self._history: dict[int, _Round] = {0: self._round}

    # -- snapshots ---------------------------------------------------------------------------
    def now(self) -> float:
        """The coordinator's clock."""
        return self._now()

    def _state(self) -> RoundState:
        return RoundState(
            round_idx=self._round.round_idx,
            version=self._version,
            state=RunState.FINISHED if self._finished else RunState.RUNNING,
            digest=self._digest,
            deadline_unix_s=None if self._finished else self._round.deadline,
        )

    def _info(self, w: _Worker) -> WorkerInfo:
        r = self._round.round_idx
        static = {
            k: getattr(w, k) for k in ("worker_id", "name", "source_id", "variant", "vocab_digest", "online")
        }
        return WorkerInfo(**static, admitted_round=r if w.worker_id in self._round.members else r + 1)

    def current_round(self) -> RoundState:
        """The open round (or, once finished, the state after the last one)."""
        with self._cond:
            self._sweep(self._now())
            return self._state()

    def worker(self, worker_id: str) -> WorkerInfo:
        """One worker's registration. Raises NotFoundError for an unknown id."""
        with self._cond:
            return self._info(self._get_worker(worker_id))

    def workers(self) -> list[WorkerInfo]:
        """Every registered worker, sorted by id."""
        with self._cond:
            self._sweep(self._now())
            return [self._info(self._workers[k]) for k in sorted(self._workers)]

    def round_record(self, round_idx: int | None = None) -> RoundRecord:
        """Members and commits (sources, train losses) of a recent round; the open one by default."""
        with self._cond:
            r = self._round if round_idx is None else self._history.get(round_idx)
            if r is None:
                raise NotFoundError(f"round {round_idx} is not in the last {HISTORY_ROUNDS} rounds")
            return RoundRecord(
                round_idx=r.round_idx,
                base_version=r.base_version,
                outcome=r.outcome,
                opened_at_s=r.opened_at,
                deadline_unix_s=r.deadline,
                ended_at_s=r.ended_at,
                members=tuple(sorted(r.members)),
                commits=tuple(r.commits[k] for k in sorted(r.commits)),
            )

    def take_dropped_uploads(self) -> list[str]:
        """Upload ids that will never count (superseded, expired, round ended); staging can go."""
        with self._cond:
            self._sweep(self._now())
            out, self._dropped = self._dropped, []
            return out

    # -- internals (lock held) ---------------------------------------------------------------
    def _get_worker(self, worker_id: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            raise NotFoundError(f"unknown worker {worker_id!r}; join first")
        if w.left:
            raise NotFoundError(f"worker {worker_id!r} has left; join again")
        return w

    def _drop_upload(self, upload_id: str, why: str) -> None:
        up = self._uploads.pop(upload_id)
        self._dropped.append(upload_id)
        self._dropped_ids.add(upload_id)
        logger.info(
            "upload_dropped upload=%s worker=%s round=%d why=%s", upload_id, up.worker_id, up.round_idx, why
        )

    def _sweep(self, now: float) -> None:
        for w in self._workers.values():
            if w.online and now - w.last_seen > self.config.heartbeat_timeout_s:
                w.online = False
                logger.warning("worker_offline worker=%s silent_s=%.1f", w.worker_id, now - w.last_seen)
        for up in list(self._uploads.values()):
            if now - up.last_active > self.config.upload_ttl_s:
                self._drop_upload(up.upload_id, "ttl")

    def _live_members(self) -> list[str]:
        return [m for m in self._round.members if self._workers[m].online]

    def _admit(self, w: _Worker, now: float) -> None:
        r = self._round
        if self._finished or w.worker_id in r.members:
            return
        live = self._live_members()
        # The round closes as soon as the ticker looks (see ready_to_close, evaluated without this
        # worker): admitting it now would only have it train for a round already over.
        others = sum(1 for k in self._workers if k != w.worker_id)
        closing = (
            len(r.commits) >= self.config.min_workers
            and all(m in r.commits for m in live)
            and others >= self.config.expected_workers
        )
        open_for_joiners = (r.deadline is None or now < r.deadline) and not closing
        if open_for_joiners and len(live) < self.config.expected_workers:
            r.members.add(w.worker_id)
            if r.deadline is None:
                r.deadline = now + self.config.round_timeout_s
            logger.info("worker_admitted worker=%s round=%d", w.worker_id, r.round_idx)

    def _touch(self, w: _Worker, now: float) -> None:
        w.last_seen = now
        if not w.online:
            w.online = True
            logger.info("worker_online worker=%s", w.worker_id)
            self._admit(w, now)

    def _fence(self, worker_id: str, round_idx: int, now: float) -> _Worker:
        if self._finished:
            raise RunFinishedError(f"the run finished after {self._version} rounds; nothing more is accepted")
        w = self._get_worker(worker_id)
        self._touch(w, now)
        cur = self._round.round_idx
        if round_idx < cur:
            raise StaleRoundError(
                f"round {round_idx} has ended; the current round is {cur} (version {self._version}): pull and retrain"
            )
        if round_idx > cur:
            raise RoundNotOpenError(f"round {round_idx} is not open yet; the current round is {cur}")
        if worker_id not in self._round.members:
            raise RoundNotOpenError(
                f"worker {worker_id} is not admitted to round {cur}; it takes part from round {cur + 1}"
            )
        return w

    def _end_round(self, outcome: str, now: float) -> None:
        old = self._round
        old.outcome, old.ended_at = outcome, now
        for up in [u for u in self._uploads.values() if u.round_idx <= old.round_idx]:
            self._drop_upload(up.upload_id, f"round {outcome}")
        if outcome == "abandoned":
            self._dropped.extend(c.upload_id for c in old.commits.values())
        self._dropped_ids.clear()
        self._open(old.round_idx + 1, now)

    def _open(self, round_idx: int, now: float) -> None:
        self._finished = self._version >= self.config.num_rounds
        live = {k for k, w in self._workers.items() if w.online and not w.left}
        members = set() if self._finished else live
        deadline = now + self.config.round_timeout_s if members else None
        self._round = _Round(
            round_idx=round_idx, base_version=self._version, opened_at=now, deadline=deadline, members=members
        )
        self._history[round_idx] = self._round
        for old in [k for k in self._history if k <= round_idx - HISTORY_ROUNDS]:
            del self._history[old]
        if self._finished:
            logger.info("run_finished rounds=%d version=%d", round_idx, self._version)
        self._cond.notify_all()

    # -- membership --------------------------------------------------------------------------
    def join(self, name: str, source_id: str, variant: str, vocab_digest: str) -> WorkerInfo:
        """Register (or re-register) a worker; the same name always gets the same worker id.

        A restarted worker that is a member of the open round stays in it; a new worker enters
        the open round if it has room and its deadline has not passed, else the next round.

        Raises:
            RunFinishedError: the run is over.
            InvalidInputError: an empty or overlong name.
            ConflictError: the name is registered with another source, variant or vocabulary.
        """
        if not name or len(name) > 256:
            raise InvalidInputError(f"worker name must have 1 to 256 characters, got {len(name)}")
        with self._cond:
            if self._finished:
                raise RunFinishedError(f"the run finished after {self._version} rounds; no more workers join")
            now = self._now()
            self._sweep(now)
            worker_id = worker_id_for(name)
            w = self._workers.get(worker_id)
            if w is not None and w.name != name:
                raise ConflictError(f"worker names {w.name!r} and {name!r} map to the same id; rename one")
            registration = (source_id, variant, vocab_digest)
            if w is not None and (w.source_id, w.variant, w.vocab_digest) != registration:
                raise ConflictError(
                    f"worker {name!r} is registered for source {w.source_id!r}, variant {w.variant!r} and "
                    f"another vocabulary; use another name for source {source_id!r}"
                )
            cap = self.config.max_workers
            live = sum(1 for k, x in self._workers.items() if x.online and not x.left and k != worker_id)
            if cap is not None and live >= cap:
                raise MembershipFullError(
                    f"the server already has {live} live workers, its --max-workers; worker {name!r} "
                    "cannot join (a worker that leaves or goes silent frees its place)"
                )
            if w is None:
                w = _Worker(worker_id, name, source_id, variant, vocab_digest, last_seen=now)
                self._workers[worker_id] = w
            w.left, w.online, w.last_seen = False, True, now
            self._admit(w, now)
            info = self._info(w)
        logger.info(
            "worker_joined worker=%s source=%s round=%d", info.worker_id, source_id, info.admitted_round
        )
        return info

    def heartbeat(self, worker_id: str) -> RoundState:
        """Record a sign of life (an offline worker comes back). Raises NotFoundError if unknown or left."""
        with self._cond:
            now = self._now()
            self._touch(self._get_worker(worker_id), now)
            self._sweep(now)
            return self._state()

    def leave(self, worker_id: str) -> None:
        """Deathrattle: the worker is offline at once and its open upload is dropped (idempotent)."""
        with self._cond:
            w = self._workers.get(worker_id)
            if w is None:
                raise NotFoundError(f"unknown worker {worker_id!r}")
            if w.left:
                return
            w.left, w.online = True, False
            for up in [u for u in self._uploads.values() if u.worker_id == worker_id]:
                self._drop_upload(up.upload_id, "left")
            self._cond.notify_all()
        logger.info("worker_left worker=%s", worker_id)

    def excuse(self, worker_id: str, round_idx: int) -> bool:
        """The open round stops waiting for a member that will not contribute (its update was
        refused); it takes part again from the next round. Returns whether anything changed.

        A worker that committed, or a round that is not open any more, is left as it is.
        """
        with self._cond:
            r = self._round
            if r.round_idx != round_idx or worker_id in r.commits or worker_id not in r.members:
                return False
            r.members.discard(worker_id)
            for up in [u for u in self._uploads.values() if u.worker_id == worker_id]:
                self._drop_upload(up.upload_id, "excused")
            self._cond.notify_all()
        logger.info("worker_excused worker=%s round=%d", worker_id, round_idx)
        return True

    # -- fencing and uploads ------------------------------------------------------------------
    def check_push(self, worker_id: str, round_idx: int) -> None:
        """Fence a push (before any byte is staged); also counts as a sign of life.

        Raises:
            RunFinishedError: the run is over.
            NotFoundError: unknown worker, or one that left.
            StaleRoundError: ``round_idx`` is older than the open round (its message names it).
            RoundNotOpenError: a future round, or a worker not admitted to the open round.
        """
        with self._cond:
            self._fence(worker_id, round_idx, self._now())

    def begin_upload(self, worker_id: str, round_idx: int, upload_id: str | None = None) -> str:
        """Open an upload for ``(worker, round)``, superseding the worker's previous open one.

        Args:
            upload_id: the worker's own id for this attempt; generated when ``None``. Beginning
                the worker's current open upload again returns it unchanged (a resumed stream).

        Raises:
            The fencing errors of :meth:`check_push`; ConflictError if the worker already
            committed for this round; PermissionDeniedError if the id is another worker's.
        """
        with self._cond:
            now = self._now()
            self._fence(worker_id, round_idx, now)
            done = self._round.commits.get(worker_id)
            if done is not None:
                raise ConflictError(
                    f"worker {worker_id} already committed upload {done.upload_id} for round {round_idx}"
                )
            if upload_id is None:
                self._seq += 1
                upload_id = f"{worker_id}-r{round_idx}-{self._nonce}-{self._seq}"
            existing = self._uploads.get(upload_id)
            if existing is not None:
                if existing.worker_id != worker_id:
                    raise PermissionDeniedError(f"upload {upload_id} belongs to another worker")
                existing.last_active = now
                return upload_id
            if upload_id in self._dropped_ids:
                raise ConflictError(f"upload {upload_id} was superseded or expired; start one with a new id")
            for up in [u for u in self._uploads.values() if u.worker_id == worker_id]:
                self._drop_upload(up.upload_id, "superseded")
            self._uploads[upload_id] = _Upload(upload_id, worker_id, round_idx, last_active=now)
            return upload_id

    def touch_upload(self, worker_id: str, upload_id: str) -> None:
        """Note activity on an open upload (chunks arriving), so that its TTL restarts.

        Raises:
            The fencing errors of :meth:`check_push`; NotFoundError if the upload is not open;
            PermissionDeniedError if it is another worker's.
        """
        with self._cond:
            now = self._now()
            up = self._uploads.get(upload_id)
            if up is None:
                raise NotFoundError(f"upload {upload_id} is not open (superseded, expired or never begun)")
            if up.worker_id != worker_id:
                raise PermissionDeniedError(f"upload {upload_id} belongs to another worker")
            self._fence(worker_id, up.round_idx, now)
            up.last_active = now

    def commit(
        self, worker_id: str, upload_id: str, round_idx: int, *, train_loss: float | None = None
    ) -> bool:
        """Count ``upload_id`` as the worker's contribution to ``round_idx``; idempotent.

        A repeated commit of the same upload returns the same answer and counts once, even after
        the round closed. An upload that was never begun is accepted as begun now.

        Returns:
            True: the contribution is counted.

        Raises:
            The fencing errors of :meth:`check_push`; ConflictError for a second, different
            upload of the same ``(worker, round)``; NotFoundError for a superseded or expired
            upload; PermissionDeniedError for another worker's upload id.
        """
        with self._cond:
            now = self._now()
            past = self._history.get(round_idx)
            done = past.commits.get(worker_id) if past is not None and past.outcome != "abandoned" else None
            if done is not None and done.upload_id == upload_id:
                return True
            w = self._fence(worker_id, round_idx, now)
            if done is not None:
                raise ConflictError(
                    f"worker {worker_id} already committed upload {done.upload_id} for round {round_idx}; "
                    f"{upload_id} cannot count too"
                )
            up = self._uploads.get(upload_id)
            if up is not None and up.worker_id != worker_id:
                raise PermissionDeniedError(f"upload {upload_id} belongs to another worker")
            if up is None and upload_id in self._dropped_ids:
                raise NotFoundError(f"upload {upload_id} was superseded or expired; push a new upload")
            for other in [
                u for u in self._uploads.values() if u.worker_id == worker_id and u.upload_id != upload_id
            ]:
                self._drop_upload(other.upload_id, "superseded")
            self._uploads.pop(upload_id, None)
            self._round.commits[worker_id] = CommitInfo(
                worker_id=worker_id,
                source_id=w.source_id,
                upload_id=upload_id,
                train_loss=train_loss,
                committed_at_s=now,
            )
            self._cond.notify_all()
        logger.info("upload_committed worker=%s upload=%s round=%d", worker_id, upload_id, round_idx)
        return True

    # -- closing -----------------------------------------------------------------------------
    def ready_to_close(self, now: float | None = None) -> bool:
        """Quorum reached and either every live member committed (once ``expected_workers`` have
        registered), or the deadline passed."""
        with self._cond:
            now = self._now() if now is None else now
            self._sweep(now)
            r = self._round
            if self._finished or len(r.commits) < self.config.min_workers:
                return False
            waiting = [m for m in self._live_members() if m not in r.commits]
            if not waiting and len(self._workers) >= self.config.expected_workers:
                return True
            return r.deadline is not None and now >= r.deadline

    def should_abandon(self, now: float | None = None) -> bool:
        """The deadline passed with fewer than ``min_workers`` commits."""
        with self._cond:
            now = self._now() if now is None else now
            self._sweep(now)
            r = self._round
            deadline_passed = r.deadline is not None and now >= r.deadline
            return not self._finished and deadline_passed and len(r.commits) < self.config.min_workers

    def _check_round_arg(self, round_idx: int | None) -> None:
        if self._finished:
            raise RunFinishedError(f"the run finished after {self._version} rounds")
        if round_idx is not None and round_idx != self._round.round_idx:
            raise StaleRoundError(
                f"round {round_idx} already ended; the current round is {self._round.round_idx}"
            )

    def close_round(self, new_digest: bytes, round_idx: int | None = None) -> RoundState:
        """The outer step was applied: ``version`` + 1, next round opens (or the run finishes).

        Args:
            new_digest: digest of the body at the new version.
            round_idx: when given, close only if it is still the open round (compare-and-set).

        Raises:
            RunFinishedError, StaleRoundError (``round_idx`` already ended), RoundNotOpenError
            (fewer than ``min_workers`` commits: abandon the round instead).
        """
        with self._cond:
            self._check_round_arg(round_idx)
            r = self._round
            if len(r.commits) < self.config.min_workers:
                raise RoundNotOpenError(
                    f"round {r.round_idx} has {len(r.commits)} commits, below the quorum of "
                    f"{self.config.min_workers}; abandon it instead"
                )
            self._version += 1
            self._digest = bytes(new_digest)
            self._end_round("closed", self._now())
            state = self._state()
        logger.info("round_closed round=%d version=%d commits=%d", r.round_idx, state.version, len(r.commits))
        return state

    def abandon_round(self, round_idx: int | None = None) -> RoundState:
        """End the open round without an outer step: model and ``version`` unchanged, commits
        discarded, and the next round opens with ``round_idx`` + 1 and a new deadline.

        Raises:
            RunFinishedError, StaleRoundError (``round_idx`` already ended).
        """
        with self._cond:
            self._check_round_arg(round_idx)
            r = self._round
            self._end_round("abandoned", self._now())
            state = self._state()
        logger.warning(
            "round_abandoned round=%d commits=%d min_workers=%d",
            r.round_idx,
            len(r.commits),
            self.config.min_workers,
        )
        return state

    def wait_for_round_after(self, round_idx: int, timeout_s: float) -> RoundState:
        """Block until the open round is newer than ``round_idx`` or the run finished, at most ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._finished or self._round.round_idx > round_idx, timeout=max(0.0, timeout_s)
            )
            return self._state()

    def restore(self, round_idx: int, version: int, digest: bytes) -> RoundState:
        """Resume from a checkpoint: the open round becomes ``round_idx`` (fresh, no commits).

        Raises:
            StaleRoundError: ``round_idx`` or ``version`` is behind the coordinator's (round ids
                never go backwards).
            InvalidInputError: ``version`` > ``round_idx`` (each round adds at most one version).
        """
        with self._cond:
            if round_idx < self._round.round_idx or version < self._version:
                raise StaleRoundError(
                    f"cannot restore round {round_idx} version {version}: the coordinator is at round "
                    f"{self._round.round_idx} version {self._version}, and round ids never go backwards"
                )
            if not 0 <= version <= round_idx:
                raise InvalidInputError(f"version {version} cannot exceed round {round_idx}")
            now = self._now()
            for up in list(self._uploads.values()):
                self._drop_upload(up.upload_id, "restore")
            self._dropped_ids.clear()
            self._round.outcome, self._round.ended_at = "abandoned", now
            self._version, self._digest = version, bytes(digest)
            self._open(round_idx, now)
            state = self._state()
        logger.info("coordinator_restored round=%d version=%d", round_idx, version)
        return state
