"""A striped pull handed to a sink while it arrives: the stripes' messages are put back into the
one stream they were cut from, in seq order, as they come, instead of being held to the end.

:func:`~dept_comm.parallel.pull_striped` holds every stripe whole and merges them afterwards: a
body's worth of messages besides what the sink decodes. :func:`pull_striped_into` gives each
stripe a sink of its own (:meth:`StripeMerger.stripe`) that hands the caller's sink the open
once, then every chunk in seq order, then the commit once every stripe brought the same one. A
chunk that comes before its turn waits in the merger; a stripe more than ``window`` chunks ahead
of the next one due waits too (it stops reading, so gRPC's flow control slows its stream), so
the merger holds at most ``window`` chunks.

Each stripe still resumes on its own after a cut (``PullProgress`` in the client). A stripe of
another stream (a version closed between the stripes' starts, or during a resume) makes the
whole pull start again, into a restarted sink, ``attempts`` times at most. A stripe's failure
stops the others at once and is what the pull raises. A stripe that skips a chunk, carries
another stripe's seq, or ends while the others wait for one of its chunks fails the pull
(``StreamOrderError``) rather than leaving it waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from dept_comm.errors import StreamOrderError
from dept_comm.frames import Undecodable, WireItem, as_message, chunk_of, kind_of
from dept_comm.parallel import StripeMismatchError, run_all, stripe_request
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb

__all__ = ["PullSink", "StripeMerger", "StripesStoppedError", "pull_striped_into"]

WINDOW_PER_STRIPE = 8  # chunks the merger may hold per stripe (8 MiB of 1 MiB chunks)


class PullSink(Protocol):
    """Takes a pull's messages as they arrive (``dept_comm.streaming.PullReceiver``)."""

    def add(self, msg: WireItem) -> None: ...

    def restart(self) -> None: ...


class StripesStoppedError(StreamOrderError):
    """Raised in a stripe's thread once another stripe failed: this one stops too."""


class _Stripe:
    """The sink one stripe's pull writes into."""

    def __init__(self, merger: StripeMerger, index: int) -> None:
        self._merger, self._index = merger, index

    def add(self, msg: WireItem) -> None:
        self._merger.add(self._index, msg)

    def restart(self) -> None:
        raise StripeMismatchError(f"stripe {self._index} began another stream; the pull starts again")


class StripeMerger:
    """Merges ``count`` stripes of one pull into ``sink`` as they arrive (one per thread)."""

    def __init__(self, sink: PullSink, count: int, *, window: int | None = None) -> None:
        self._sink, self._count = sink, count
        self.window = window if window is not None else WINDOW_PER_STRIPE * count
        self._cond = threading.Condition()
        self._open: pb.StreamOpen | None = None
        self._commits: dict[int, pb.Commit] = {}
        self._waiting: dict[int, WireItem] = {}  # seq -> chunk that came before its turn
        self._next = 0  # the seq the sink gets next
        self._ended: set[int] = set()  # stripes whose pull returned
        self.failure: BaseException | None = None

    def stripe(self, index: int) -> _Stripe:
        return _Stripe(self, index)

    def ended(self, index: int) -> None:
        """Stripe ``index``'s pull returned: nothing more comes from it."""
        with self._cond:
            self._ended.add(index)
            self._cond.notify_all()

    def fail(self, err: BaseException) -> None:
        """A stripe failed: every other stops at its next message (the first failure is kept)."""
        with self._cond:
            if self.failure is None:
                self.failure = err
            self._cond.notify_all()

    def add(self, index: int, msg: WireItem) -> None:
        with self._cond:
            self._check_live()
            if isinstance(msg, Undecodable):
                self._sink.add(msg)  # the sink refuses it with its reason
                return
            kind = kind_of(msg)
            if kind == "open":
                self._add_open(index, as_message(msg).open)
            elif kind == "commit":
                self._add_commit(index, as_message(msg).commit)
            elif (chunk := chunk_of(msg)) is not None:
                self._add_chunk(index, chunk.seq, msg)
            else:
                self._sink.add(msg)  # anything else: the sink says what is wrong with it

    def _check_live(self) -> None:
        if self.failure is not None:
            raise StripesStoppedError(f"another stripe failed: {self.failure}")

    def _add_open(self, index: int, opened: pb.StreamOpen) -> None:
        if self._open is None:
            self._open = opened
            self._sink.add(pb.StreamMessage(open=opened))
        elif opened != self._open:
            raise StripeMismatchError(
                f"stripe {index} is stream {opened.upload_id!r} (v{opened.target_version}), "
                f"the pull began {self._open.upload_id!r} (v{self._open.target_version})"
            )

    def _add_commit(self, index: int, commit: pb.Commit) -> None:
        for other in self._commits.values():
            if other != commit:
                raise StripeMismatchError(f"stripe {index} ends with a different commit")
        self._commits[index] = commit

    def _add_chunk(self, index: int, seq: int, msg: WireItem) -> None:
        if self._open is None:
            raise StreamOrderError(f"chunk seq={seq} before the stream's open")
        if seq % self._count != index:
            raise StreamOrderError(f"stripe {index} of {self._count} carried chunk seq={seq}")
        if seq < self._next or seq in self._waiting:
            return  # already handed on or held (a resend)
        if self._next % self._count == index and seq > self._next:
            raise StreamOrderError(f"stripe {index} skipped chunk seq={self._next}")  # it comes in order
        while seq - self._next >= self.window:  # too far ahead: wait for the others
            owner = self._next % self._count
            if owner in self._ended:
                raise StreamOrderError(f"stripe {owner} ended without chunk seq={self._next}")
            self._cond.wait()
            self._check_live()
        self._waiting[seq] = msg
        while self._next in self._waiting:
            self._sink.add(self._waiting.pop(self._next))
            self._next += 1
        self._cond.notify_all()

    def finish(self) -> list[WireItem]:
        """Once every stripe ended: hand on what still waits (a gap the sink will report) and the
        commit if every stripe brought it; returns the open and the commit (no chunk), as a
        single-stream pull into a sink does."""
        with self._cond:
            for seq in sorted(self._waiting):
                self._sink.add(self._waiting.pop(seq))
            out: list[WireItem] = []
            if self._open is not None:
                out.append(pb.StreamMessage(open=self._open))
            if len(self._commits) == self._count:
                commit = pb.StreamMessage(commit=next(iter(self._commits.values())))
                self._sink.add(commit)
                out.append(commit)
            return out


def pull_striped_into(
    pull_one: Callable[[service_pb2.PullRequest, PullSink], object],
    request: service_pb2.PullRequest,
    count: int,
    sink: PullSink,
    *,
    attempts: int = 3,
    window: int | None = None,
) -> list[WireItem]:
    """Pull ``count`` stripes of ``request`` at once into ``sink`` (``pull_one(stripe_request,
    stripe_sink)`` pulls and resumes one), merged as they arrive.

    Returns:
        the stream's open and commit (the chunks went to ``sink``).

    Raises:
        StripeMismatchError: the stripes were still of different streams after ``attempts``
            fresh starts.
        the first failure of any stripe (the others are stopped), e.g. what ``sink`` raises.
    """
    for attempt in range(attempts + 1):
        merger = StripeMerger(sink, count, window=window)

        def one(i: int, merger: StripeMerger = merger) -> Callable[[], object]:
            def call() -> object:
                try:
                    got = pull_one(stripe_request(request, i, count), merger.stripe(i))
                except BaseException as err:
                    merger.fail(err)
                    raise
                merger.ended(i)
                return got

            return call

        try:
            run_all([one(i) for i in range(count)], name="pull-stripe")
        except BaseException as err:
            cause = merger.failure if merger.failure is not None else err
            if isinstance(cause, StripeMismatchError) and attempt < attempts:
                sink.restart()
                continue
            raise cause from None
        return merger.finish()
    raise AssertionError("unreachable")  # the last attempt returns or raises
