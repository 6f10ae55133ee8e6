"""Stall detection for long streams: no deadline for a whole transfer, one for each message instead.

A pull or push of a large model over a slow link can take hours, so a single deadline for the
whole call is either too short for big transfers or useless against a stuck one. A
:class:`StallGuard` cancels the call once no message has moved for ``idle_s`` seconds (see
``dept_comm.channel.chunk_timeout_s`` for a per-chunk figure), and the caller turns that into a
:class:`StalledStreamError`, which ``call_with_retry`` retries like ``DEADLINE_EXCEEDED``. Uploads
then resume from what the receiver holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TypeVar

import grpc

__all__ = ["StallGuard", "StalledStreamError"]

T = TypeVar("T")


class StalledStreamError(grpc.RpcError):
    """A stream on which no message moved for ``idle_s`` seconds; it was cancelled.

    Reports ``DEADLINE_EXCEEDED`` through ``code()`` so that retry policies treat it as one.
    """

    def __init__(self, idle_s: float) -> None:
        super().__init__(f"no message moved for {idle_s:.1f} s; the stream was cancelled")
        self.idle_s = idle_s

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return str(self)


class StallGuard:
    """Calls the ``on_stall`` callback (e.g. ``call.cancel``) once no message moved for ``idle_s``.

    Use as a context manager around the call; wrap the messages with :meth:`guarded` (or call
    :meth:`poke` per message). A watchdog thread runs while the context is open; once the guard
    has fired, whatever the cancelled call raises (``grpc.RpcError``,
    ``grpc.FutureCancelledError``) leaves the context as a :class:`StalledStreamError`. ``clock``
    and :meth:`check` let tests drive it without waiting.
    """

    def __init__(
        self, idle_s: float, *, clock: Callable[[], float] = time.monotonic, poll_s: float | None = None
    ) -> None:
        if idle_s <= 0:
            raise ValueError(f"idle_s must be > 0, got {idle_s}")
        self.idle_s = idle_s
        self._clock = clock
        self._poll_s = poll_s if poll_s is not None else min(1.0, idle_s / 4)
        self._last = clock()
        self._on_stall: Callable[[], object] | None = None
        self._fired = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def fired(self) -> bool:
        """Whether the guard cancelled the call."""
        return self._fired

    def on_stall(self, callback: Callable[[], object]) -> None:
        """What to do on a stall (usually the call's ``cancel``); the idle clock restarts now."""
        with self._lock:
            self._on_stall = callback
            self._last = self._clock()

    def poke(self) -> None:
        """A message moved."""
        self._last = self._clock()

    def guarded(self, messages: Iterable[T]) -> Iterator[T]:
        """``messages``, poking the guard as each one moves."""
        for m in messages:
            self.poke()
            yield m

    def check(self) -> bool:
        """Fire if idle for longer than ``idle_s`` (once); return whether the guard has fired."""
        with self._lock:
            if not self._fired and self._clock() - self._last > self.idle_s:
                self._fired = True
                if self._on_stall is not None:
                    self._on_stall()
            return self._fired

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            if self.check():
                return

    def __enter__(self) -> StallGuard:
        self._last = self._clock()
        self._thread = threading.Thread(target=self._watch, name="stall-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._fired and isinstance(exc, (grpc.RpcError, grpc.FutureCancelledError)):
            raise StalledStreamError(self.idle_s) from exc
