"""Bounded concurrency: stream slots refused with a retry hint, and bounded long polls.

gRPC's sync server runs each handler on one pool thread, for as long as the handler runs. Pulls
and pushes hold theirs for the whole transfer, so they get at most ``--max-streams`` slots; a
further one is refused at once with ``OverloadedError`` (RESOURCE_EXHAUSTED) carrying a retry
hint, instead of queueing behind busy threads. Round waits hold no thread at all (WatchRounds,
``server.watch``); the legacy WaitRound long poll holds one for at most a few seconds, and only
``WAIT_SLOTS`` of them at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dept_comm.errors import OverloadedError

logger = logging.getLogger(__name__)
WAIT_SLOTS = 4  # WaitRound long polls held at once; others are answered at once
UNARY_THREADS = 8  # pool threads for short calls (join, commit, heartbeat, ...) beyond the stream slots
MIN_HINT_S, MAX_HINT_S = 0.5, 30.0


def pool_threads(max_streams: int) -> int:
    """RPC pool size for ``max_streams`` stream slots: streams, bounded waits and short calls never starve each other."""
    return max_streams + WAIT_SLOTS + UNARY_THREADS


class StreamSlots:
    """At most ``limit`` streams at once; the retry hint is the recent mean time a stream held its slot."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"stream slots must be >= 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._held = 0
        self._mean_s = 1.0
        self.refused = 0

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def acquire(self, what: str) -> float:
        """Take a slot (returns the start time for :meth:`release`).

        Raises:
            OverloadedError: every slot is held; its ``retry_after_s`` says when to come back.
        """
        with self._lock:
            if self._held >= self.limit:
                self.refused += 1
                hint = min(MAX_HINT_S, max(MIN_HINT_S, self._mean_s))
                logger.info(
                    "stream_refused what=%s held=%d limit=%d retry_after_s=%.2f",
                    what,
                    self._held,
                    self.limit,
                    hint,
                )
                raise OverloadedError(
                    f"server busy: {self._held} of {self.limit} streams in flight (--max-streams); "
                    f"{what} refused, retry in about {hint:.1f} s",
                    retry_after_s=hint,
                )
            self._held += 1
        return time.monotonic()

    def release(self, started: float) -> None:
        with self._lock:
            self._held -= 1
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - started)

    @contextmanager
    def slot(self, what: str) -> Iterator[None]:
        started = self.acquire(what)
        try:
            yield
        finally:
            self.release(started)
