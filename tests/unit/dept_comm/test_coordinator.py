"""RoundCoordinator: fencing, idempotent commits, quorum and deadlines, liveness, restore, threads."""

from __future__ import annotations

import threading
import time

import pytest

from dept_comm.coordinator import CoordinatorConfig, RoundCoordinator, RunState, worker_id_for
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


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, **overrides: float) -> RoundCoordinator:
    params = {
        "num_rounds": 3,
        "expected_workers": 2,
        "min_workers": 1,
        "round_timeout_s": 100.0,
        "heartbeat_timeout_s": 30.0,
        "upload_ttl_s": 50.0,
    }
    params.update(overrides)
    return RoundCoordinator(CoordinatorConfig(**params), now=clock)  # type: ignore[arg-type]


def join(c: RoundCoordinator, name: str) -> str:
    return c.join(name, f"src-{name}", "spec", "vocab").worker_id


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="min_workers"):
        CoordinatorConfig(num_rounds=1, expected_workers=2, min_workers=3)
    with pytest.raises(ValueError, match="num_rounds"):
        CoordinatorConfig(num_rounds=0, expected_workers=1)
    with pytest.raises(ValueError, match="round_timeout_s"):
        CoordinatorConfig(num_rounds=1, expected_workers=1, round_timeout_s=float("inf"))


def test_stable_worker_ids_per_name() -> None:
    c = make(Clock())
    a = c.join("host1:sw", "sw", "spec", "v")
    again = c.join("host1:sw", "sw", "spec", "v")
    b = c.join("host2:code", "code", "spec", "v")
    assert a.worker_id == again.worker_id == worker_id_for("host1:sw")
    assert b.worker_id != a.worker_id
    assert make(Clock()).join("host1:sw", "sw", "spec", "v").worker_id == a.worker_id  # across restarts
    with pytest.raises(ConflictError, match="source 'sw'"):
        c.join("host1:sw", "yo", "spec", "v")
    with pytest.raises(InvalidInputError):
        c.join("", "sw", "spec", "v")


def test_fencing_codes() -> None:
    clock = Clock()
    c = make(clock, num_rounds=1)
    w = join(c, "a")
    c.check_push(w, 0)
    with pytest.raises(RoundNotOpenError, match="current round is 0"):
        c.check_push(w, 1)
    with pytest.raises(NotFoundError, match="join first"):
        c.check_push("w-nobody", 0)
    c.commit(w, "u1", 0)
    state = c.close_round(b"d1")
    assert state.finished and state.state is RunState.FINISHED and state.version == 1
    with pytest.raises(RunFinishedError):
        c.check_push(w, 1)
    with pytest.raises(RunFinishedError):
        c.join("late", "x", "spec", "v")


def test_stale_round_names_the_current_round() -> None:
    clock = Clock()
    c = make(clock)
    w = join(c, "a")
    c.commit(w, "u1", 0)
    c.close_round(b"d1")
    with pytest.raises(StaleRoundError, match="current round is 1") as err:
        c.check_push(w, 0)
    assert err.value.status == "ABORTED"


def test_commit_is_idempotent_and_counted_once() -> None:
    c = make(Clock())
    a, b = join(c, "a"), join(c, "b")
    up = c.begin_upload(a, 0)
    assert c.commit(a, up, 0, train_loss=2.5) is True
    assert c.commit(a, up, 0, train_loss=2.5) is True  # lost ack, retried
    assert len(c.round_record().commits) == 1
    with pytest.raises(ConflictError, match="already committed"):
        c.commit(a, "another", 0)
    with pytest.raises(ConflictError, match="already committed"):
        c.begin_upload(a, 0)
    c.commit(b, "ub", 0, train_loss=3.0)
    assert c.ready_to_close()
    c.close_round(b"d1")
    assert c.commit(a, up, 0) is True  # replay after the round closed: same answer, not recounted
    record = c.round_record(0)
    assert record.outcome == "closed"
    assert [(ci.worker_id, ci.source_id, ci.train_loss) for ci in record.commits] == sorted(
        [(a, "src-a", 2.5), (b, "src-b", 3.0)]
    )
    assert c.round_record().commits == ()


def test_uploads_supersede_and_permissions() -> None:
    clock = Clock()
    c = make(clock)
    a, b = join(c, "a"), join(c, "b")
    first = c.begin_upload(a, 0)
    second = c.begin_upload(a, 0)
    assert first != second
    assert c.begin_upload(a, 0, second) == second  # resuming the open upload
    assert c.take_dropped_uploads() == [first]
    with pytest.raises(NotFoundError, match="superseded"):
        c.commit(a, first, 0)
    with pytest.raises(PermissionDeniedError):
        c.commit(b, second, 0)
    with pytest.raises(PermissionDeniedError):
        c.touch_upload(b, second)
    with pytest.raises(PermissionDeniedError):
        c.begin_upload(b, 0, second)
    assert c.commit(a, second, 0)


def test_upload_ttl_and_touch() -> None:
    clock = Clock()
    c = make(clock, heartbeat_timeout_s=1000.0)
    a = join(c, "a")
    up = c.begin_upload(a, 0)
    clock.t += 40
    c.touch_upload(a, up)  # activity restarts the TTL
    clock.t += 40
    assert c.take_dropped_uploads() == []
    clock.t += 11
    assert c.take_dropped_uploads() == [up]
    with pytest.raises(NotFoundError):
        c.touch_upload(a, up)
    with pytest.raises(NotFoundError, match="expired"):
        c.commit(a, up, 0)


def test_all_expected_committed_closes_early() -> None:
    clock = Clock()
    c = make(clock)
    a = join(c, "a")
    c.commit(a, "ua", 0)
    assert not c.ready_to_close()  # two workers are expected and only one has registered
    b = join(c, "b")
    assert c.worker(b).admitted_round == 0
    assert not c.ready_to_close()
    c.commit(b, "ub", 0)
    assert c.ready_to_close()
    state = c.close_round(b"d1", round_idx=0)
    assert (state.round_idx, state.version, state.digest) == (1, 1, b"d1")
    with pytest.raises(StaleRoundError):
        c.close_round(b"d1", round_idx=0)  # closes exactly once
    assert c.current_round().version == 1


def test_dead_worker_is_not_waited_for_in_later_rounds() -> None:
    clock = Clock()
    c = make(clock, heartbeat_timeout_s=30.0)
    a, b = join(c, "a"), join(c, "b")
    c.commit(a, "ua0", 0)
    c.commit(b, "ub0", 0)
    c.close_round(b"d1")
    clock.t += 31
    c.heartbeat(a)  # b died silently
    assert not c.worker(b).online
    c.commit(a, "ua1", 1)
    assert c.ready_to_close()  # no need to wait for the deadline


def test_quorum_close_at_deadline() -> None:
    clock = Clock()
    c = make(clock, expected_workers=3, min_workers=2, heartbeat_timeout_s=1000.0)
    a, b, _ = join(c, "a"), join(c, "b"), join(c, "c")
    deadline = c.current_round().deadline_unix_s
    assert deadline == clock.t + 100
    c.commit(a, "ua", 0)
    c.commit(b, "ub", 0)
    assert not c.ready_to_close()
    clock.t = deadline - 0.5
    assert not c.ready_to_close()
    assert c.ready_to_close(deadline)
    assert not c.should_abandon(deadline)
    state = c.close_round(b"d")
    assert state.version == 1 and state.round_idx == 1


def test_below_quorum_is_abandoned_version_unchanged() -> None:
    clock = Clock()
    c = make(clock, expected_workers=3, min_workers=2, heartbeat_timeout_s=1000.0)
    a, b, _ = join(c, "a"), join(c, "b"), join(c, "c")
    up = c.begin_upload(b, 0)
    c.commit(a, "ua", 0)
    clock.t += 100
    assert not c.ready_to_close()
    assert c.should_abandon()
    with pytest.raises(RoundNotOpenError, match="quorum"):
        c.close_round(b"x")
    state = c.abandon_round()
    assert (state.round_idx, state.version, state.digest) == (1, 0, b"")
    assert state.deadline_unix_s == clock.t + 100
    assert sorted(c.take_dropped_uploads()) == sorted([up, "ua"])
    assert c.round_record(0).outcome == "abandoned"
    with pytest.raises(StaleRoundError):
        c.commit(a, "ua", 0)  # its contribution was discarded with the round
    c.check_push(a, 1)


def test_heartbeat_expiry_drops_worker_from_expected_set() -> None:
    clock = Clock()
    c = make(clock)
    a, b = join(c, "a"), join(c, "b")
    c.commit(a, "ua", 0)
    clock.t += 20
    c.heartbeat(a)
    assert not c.ready_to_close()  # b is still expected
    clock.t += 11  # b silent for 31 s > 30 s
    assert c.ready_to_close()  # every live member committed
    assert not c.worker(b).online
    c.heartbeat(b)  # back before the close: expected again
    assert c.worker(b).online
    assert not c.ready_to_close()


def test_leave_takes_effect_immediately() -> None:
    clock = Clock()
    c = make(clock)
    a, b = join(c, "a"), join(c, "b")
    up = c.begin_upload(b, 0)
    c.commit(a, "ua", 0)
    assert not c.ready_to_close()
    c.leave(b)
    c.leave(b)  # idempotent
    assert c.ready_to_close()
    assert c.take_dropped_uploads() == [up]
    with pytest.raises(NotFoundError, match="left"):
        c.heartbeat(b)
    assert c.join("b", "src-b", "spec", "vocab").worker_id == b  # may come back with the same id


def test_joiners_wait_for_next_round_when_full_or_late() -> None:
    clock = Clock()
    c = make(clock)
    a, b = join(c, "a"), join(c, "b")
    late = c.join("c", "src-c", "spec", "vocab")
    assert late.admitted_round == 1
    with pytest.raises(RoundNotOpenError, match="from round 1"):
        c.check_push(late.worker_id, 0)
    c.commit(a, "ua", 0)
    c.commit(b, "ub", 0)
    c.close_round(b"d1")
    assert c.worker(late.worker_id).admitted_round == 1
    c.check_push(late.worker_id, 1)  # every live worker is a member of the new round
    assert c.round_record().members == tuple(sorted([a, b, late.worker_id]))


def test_restarted_member_rejoins_its_open_round_but_not_after_deadline() -> None:
    clock = Clock()
    c = make(clock, expected_workers=2, heartbeat_timeout_s=10.0)
    a, b = join(c, "a"), join(c, "b")
    clock.t += 50  # both silent: offline
    assert [w.online for w in c.workers()] == [False, False]
    back = c.join("a", "src-a", "spec", "vocab")
    assert (back.worker_id, back.admitted_round, back.online) == (a, 0, True)  # still a member
    c.check_push(a, 0)
    clock.t += 60  # past the deadline
    c.leave(b)
    new = c.join("d", "src-d", "spec", "vocab")
    assert new.admitted_round == 1


def test_deadline_starts_with_first_member() -> None:
    clock = Clock()
    c = make(clock)
    assert c.current_round().deadline_unix_s is None
    clock.t += 500
    assert not c.should_abandon()
    join(c, "a")
    assert c.current_round().deadline_unix_s == clock.t + 100


def test_run_finishes_after_num_rounds_of_outer_steps() -> None:
    clock = Clock()
    c = make(clock, num_rounds=2, expected_workers=1)
    a = join(c, "a")
    c.commit(a, "u0", 0)
    c.close_round(b"d1")
    clock.t += 200
    assert c.should_abandon()
    c.abandon_round()  # does not count as a round of the run
    c.commit(a, "u2", 2)
    state = c.close_round(b"d2")
    assert state.finished and state.version == 2
    assert c.wait_for_round_after(2, timeout_s=0).finished
    with pytest.raises(RunFinishedError):
        c.abandon_round()
    assert not c.ready_to_close() and not c.should_abandon()
    assert c.heartbeat(a).finished  # workers learn it from their heartbeat


def test_restore_never_goes_backwards() -> None:
    clock = Clock()
    c = make(clock, num_rounds=10)
    state = c.restore(5, 4, b"digest")
    assert (state.round_idx, state.version, state.digest) == (5, 4, b"digest")
    with pytest.raises(StaleRoundError, match="never go backwards"):
        c.restore(3, 3, b"old")
    with pytest.raises(StaleRoundError):
        c.restore(6, 2, b"old")
    with pytest.raises(InvalidInputError):
        c.restore(6, 7, b"x")
    a = join(c, "a")
    with pytest.raises(StaleRoundError, match="current round is 5"):
        c.check_push(a, 4)
    c.commit(a, "u", 5)
    assert c.close_round(b"n").round_idx == 6
    assert c.restore(8, 5, b"n").round_idx == 8
    assert c.restore(10, 10, b"end").finished


def test_wait_for_round_after_wakes_on_close() -> None:
    c = make(Clock(), expected_workers=1)
    a = join(c, "a")
    assert c.wait_for_round_after(0, timeout_s=0).round_idx == 0  # times out at once
    results = []
    woke = threading.Event()

    def waiter() -> None:
        # Its own timeout is far past the test's: only the close can end this wait in time.
        results.append(c.wait_for_round_after(0, timeout_s=3600))
        woke.set()

    t = threading.Thread(target=waiter, daemon=True)  # a waiter never woken must not hold up the run
    t.start()
    # Close only once the waiter is parked on the coordinator's condition (CPython's Condition
    # keeps one lock per waiting thread), so the close is what wakes it, not a check before waiting.
    deadline = time.monotonic() + 60
    while len(c._cond._waiters) == 0:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline and t.is_alive(), "the waiter never started waiting"
        time.sleep(0.01)
    c.commit(a, "u", 0)
    c.close_round(b"d1")
    assert woke.wait(60), "closing the round did not wake the waiter"
    assert results[0].round_idx == 1 and results[0].version == 1


def test_concurrent_commits_count_exactly_once_each() -> None:
    num_workers, repeats = 8, 20
    c = make(Clock(), expected_workers=num_workers, num_rounds=5)
    ids = [join(c, f"w{i}") for i in range(num_workers)]
    barrier = threading.Barrier(num_workers * 2)
    errors: list[BaseException] = []

    def hammer(worker_id: str) -> None:
        barrier.wait()
        try:
            for _ in range(repeats):
                assert c.commit(worker_id, f"up-{worker_id}", 0)
                c.heartbeat(worker_id)
                c.ready_to_close()
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=hammer, args=(w,)) for w in ids for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not [t for t in threads if t.is_alive()] and not errors
    record = c.round_record()
    assert [ci.worker_id for ci in record.commits] == sorted(ids)
    assert len({ci.upload_id for ci in record.commits}) == num_workers
    assert c.ready_to_close()
    closers = []

    def close() -> None:
        try:
            closers.append(c.close_round(b"d", round_idx=0).version)
        except StaleRoundError:
            closers.append(None)

    threads = [threading.Thread(target=close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not [t for t in threads if t.is_alive()]
    assert sorted(closers, key=str) == [1, None, None, None]  # exactly one close advanced the round
    assert c.current_round().version == 1


# -- membership beyond --workers, a closing round, excused members, the live-worker cap ----------


def _commit(c: RoundCoordinator, worker_id: str, round_idx: int = 0) -> None:
    upload = c.begin_upload(worker_id, round_idx)
    c.commit(worker_id, upload, round_idx)


def test_a_joiner_beyond_expected_workers_takes_part_from_the_next_round() -> None:
    c = make(Clock(), expected_workers=2, min_workers=2)
    a, b = join(c, "a"), join(c, "b")
    extra = c.join("x", "src-x", "spec", "vocab")
    assert extra.admitted_round == 1  # known at join: no room in round 0
    with pytest.raises(RoundNotOpenError, match="takes part from round 1"):
        c.check_push(extra.worker_id, 0)
    _commit(c, a)
    _commit(c, b)
    assert c.ready_to_close()
    c.close_round(b"d1")
    # Round 1 admits every live worker, the extra one included, and waits for all three.
    assert set(c.round_record().members) == {a, b, extra.worker_id}
    assert c.worker(extra.worker_id).admitted_round == 1
    _commit(c, a, 1)
    _commit(c, b, 1)
    assert not c.ready_to_close()
    _commit(c, extra.worker_id, 1)
    assert c.ready_to_close()


def test_a_round_that_is_closing_admits_no_one() -> None:
    c = make(Clock(), expected_workers=2, min_workers=1)
    a = join(c, "a")
    _commit(c, a)
    # Only one of the two expected workers registered: the round still waits for slow starters.
    b = c.join("b", "src-b", "spec", "vocab")
    assert b.admitted_round == 0
    _commit(c, b.worker_id)
    # Every live member committed: a joiner now would only train for a round already over.
    late = c.join("late", "src-late", "spec", "vocab")
    assert late.admitted_round == 1
    assert c.ready_to_close()


def test_an_excused_member_is_not_waited_for() -> None:
    c = make(Clock(), expected_workers=3, min_workers=2)
    a, b, x = join(c, "a"), join(c, "b"), join(c, "x")
    _commit(c, a)
    _commit(c, b)
    upload = c.begin_upload(x, 0)
    assert not c.ready_to_close()
    assert c.excuse(x, 0)
    assert upload in c.take_dropped_uploads()  # its staging can go
    assert c.ready_to_close()
    assert not c.excuse(x, 0) and not c.excuse(a, 0)  # already out; a committed
    with pytest.raises(RoundNotOpenError):
        c.check_push(x, 0)
    c.close_round(b"d1")
    assert x in c.round_record().members  # back from the next round


def test_max_workers_caps_live_workers() -> None:
    clock = Clock()
    c = make(clock, expected_workers=1, max_workers=2, heartbeat_timeout_s=10.0)
    a, _ = join(c, "a"), join(c, "b")
    with pytest.raises(MembershipFullError, match="--max-workers"):
        join(c, "c")
    assert join(c, "a") == a  # a live worker joining again is no new member
    c.leave(a)
    join(c, "c")  # a's place is free
    with pytest.raises(MembershipFullError):
        join(c, "d")
    clock.t += 11.0  # everyone silent past the heartbeat timeout: offline, their places free
    join(c, "d")
    with pytest.raises(ValueError, match="max_workers"):
        CoordinatorConfig(num_rounds=1, expected_workers=3, max_workers=2)
