"""dept_comm.readahead: a stream read ahead on a helper thread is the same stream; helpers are
bounded and end with their stream."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import pytest

from dept_comm.readahead import ReadAhead, _Ahead


def helpers(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Feed:
    """A blocking source, as gRPC's request iterator is: ``next`` waits for the peer."""

    def __init__(self) -> None:
        self.q: queue.Queue[object] = queue.Queue()
        self.taken = 0

    def __iter__(self) -> Iterator[object]:
        return self

    def __next__(self) -> object:
        item = self.q.get()
        if item is StopIteration:
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        self.taken += 1
        return item


def fed(n: int) -> Feed:
    """A source with ``n`` messages waiting (0, 1, ...), then nothing until told."""
    feed = Feed()
    for i in range(n):
        feed.q.put(i)
    return feed


def test_a_stream_read_ahead_is_the_same_stream_and_its_error_comes_after_its_messages() -> None:
    ra = ReadAhead(streams=1, depth=3, name="ra-same")
    with ra.reading(iter(range(100))) as got:
        assert list(got) == list(range(100))

    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("cut")

    with ra.reading(failing()) as got:
        seen = []
        with pytest.raises(ValueError, match="cut"):
            for x in got:
                seen.append(x)
        assert seen == [1, 2]
    assert wait_until(lambda: not helpers("ra-same"))


def test_the_helper_reads_at_most_depth_messages_ahead_while_the_handler_works() -> None:
    feed = fed(10)
    ra = ReadAhead(streams=1, depth=3, name="ra-depth")
    with ra.reading(feed) as got:
        it = iter(got)
        assert next(it) == 0
        # One handed over, three queued, and the helper holding the fifth while it waits for room.
        assert wait_until(lambda: feed.taken == 5)
        time.sleep(0.1)
        assert feed.taken == 5
        feed.q.put(StopIteration)
        assert list(it) == list(range(1, 10))


def test_helpers_are_bounded_and_one_is_freed_when_its_stream_ends() -> None:
    ra = ReadAhead(streams=1, depth=2, name="ra-bound")
    first, second = Feed(), Feed()
    with ra.reading(first) as a, ra.reading(second) as b:
        assert b is second  # no helper free: the handler reads the stream itself
        assert a is not first
        first.q.put("x")
        first.q.put(StopIteration)
        assert list(a) == ["x"]
    assert wait_until(lambda: not helpers("ra-bound"))
    third = Feed()
    with ra.reading(third) as c:  # the helper is free again
        assert c is not third
    # Left early: the helper waits in its source until the call ends (gRPC then ends the iterator).
    assert helpers("ra-bound")
    third.q.put(StopIteration)
    assert wait_until(lambda: not helpers("ra-bound"))


def test_a_handler_leaving_early_frees_the_queue_and_the_helper_leaves_with_the_stream() -> None:
    feed = fed(50)
    ra = ReadAhead(streams=1, depth=4, name="ra-early")
    with ra.reading(feed) as got:
        assert next(iter(got)) == 0  # the handler refuses the stream after one message
    taken = feed.taken
    time.sleep(0.2)
    assert feed.taken <= taken + 1  # it stopped queueing
    feed.q.put(StopIteration)  # the call ends
    assert wait_until(lambda: not helpers("ra-early"))
    with ra.reading(iter([1, 2])) as again:
        assert list(again) == [1, 2]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        ReadAhead(streams=-1)
    with pytest.raises(ValueError):
        ReadAhead(depth=0)
    with ReadAhead(streams=0).reading(iter([1])) as same:  # 0: never read ahead
        assert list(same) == [1]


def test_a_message_put_while_the_handler_closes_is_not_left_queued() -> None:
    """The handler leaves (close: stop, then drain) while the helper is inside its put: what that
    put queues after the drain is drained by the helper, not held until the call ends."""
    feed = Feed()
    ahead = _Ahead(feed, 4, threading.Semaphore(0), "ra-race")
    real_put = ahead._queue.put

    def put_racing_close(item: object, *args: object, **kwargs: object) -> None:
        ahead.close()  # the handler closes between the helper's check and its put
        real_put(item, *args, **kwargs)

    ahead._queue.put = put_racing_close  # type: ignore[method-assign]
    feed.q.put("late")
    assert wait_until(lambda: feed.taken == 1)
    feed.q.put(StopIteration)
    ahead._thread.join(5)
    assert not ahead._thread.is_alive()
    assert ahead._queue.qsize() == 0
