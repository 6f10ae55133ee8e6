"""StallGuard: fires once after ``idle_s`` without a message, never while messages move."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from dept_comm.channel import call_with_retry
from dept_comm.stall import StalledStreamError, StallGuard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fires_once_after_idle_and_not_while_poked():
    clock, cancels = Clock(), []
    guard = StallGuard(5.0, clock=clock)
    guard.on_stall(lambda: cancels.append(clock.now))
    for _ in range(20):  # 20 messages, 4 s apart: never 5 s idle
        clock.now += 4.0
        assert not guard.check()
        guard.poke()
    clock.now += 5.0
    assert not guard.check()  # exactly idle_s is not a stall
    clock.now += 0.5
    assert guard.check() and guard.fired and cancels == [clock.now]
    clock.now += 100.0
    assert guard.check() and len(cancels) == 1  # once


def test_guarded_pokes_per_message_and_on_stall_restarts_the_clock():
    clock = Clock()
    guard = StallGuard(1.0, clock=clock)
    clock.now += 10.0
    guard.on_stall(lambda: None)  # attaching restarts the idle clock
    assert not guard.check()

    def slow_source():
        for i in range(3):
            clock.now += 0.9
            yield i

    assert list(guard.guarded(slow_source())) == [0, 1, 2]
    assert not guard.check()


def test_watchdog_thread_cancels_a_stuck_call():
    cancelled = []
    with StallGuard(0.2, poll_s=0.02) as guard:
        guard.on_stall(lambda: cancelled.append(True))
        for _ in range(500):
            if guard.fired:
                break
            time.sleep(0.02)
    assert cancelled == [True]


def test_a_stall_is_retried_like_a_deadline():
    attempts = []

    def call():
        attempts.append(1)
        if len(attempts) < 3:
            raise StalledStreamError(25.0)
        return "done"

    assert call_with_retry(call, attempts=5, sleep=lambda s: None) == "done" and len(attempts) == 3
    err = StalledStreamError(25.0)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "25.0 s" in err.details()
    with pytest.raises(ValueError):
        StallGuard(0)


def test_a_fired_guard_turns_the_cancelled_calls_error_into_a_stall():
    clock = Clock()
    with pytest.raises(StalledStreamError) as info, StallGuard(1.0, clock=clock) as guard:
        clock.now += 2.0
        assert guard.check()
        raise grpc.FutureCancelledError()
    assert isinstance(info.value.__cause__, grpc.FutureCancelledError)
    # Not fired: the error is the call's own.
    with pytest.raises(grpc.FutureCancelledError), StallGuard(1.0, clock=Clock()):
        raise grpc.FutureCancelledError()


def test_retry_for_s_outlasts_a_server_restart_and_then_gives_up():
    """Calls keep failing for 40 s (a server restarting on a busy host): 3 attempts alone give
    up within seconds; a 60 s window gets through; a 10 s window gives up once both are spent."""
    clock = Clock()

    def sleep(s: float) -> None:
        clock.now += s

    def restarting(until: float) -> Callable[[], str]:
        def call() -> str:
            clock.now += 0.01
            if clock.now < until:
                raise StalledStreamError(1.0)  # DEADLINE_EXCEEDED: retried like UNAVAILABLE
            return "up"

        return call

    start = clock.now
    with pytest.raises(StalledStreamError):
        call_with_retry(restarting(start + 40), attempts=3, sleep=sleep, clock=clock)
    assert clock.now - start < 40

    start = clock.now
    assert (
        call_with_retry(restarting(start + 40), attempts=3, retry_for_s=60, sleep=sleep, clock=clock) == "up"
    )
    assert clock.now - start < 60 + 20  # at most one back-off past the window

    start = clock.now
    with pytest.raises(StalledStreamError):
        call_with_retry(restarting(start + 1000), attempts=3, retry_for_s=10, sleep=sleep, clock=clock)
    assert 10 <= clock.now - start < 10 + 20
