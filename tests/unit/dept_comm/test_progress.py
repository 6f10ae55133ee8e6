"""dept_comm.progress: progress lines with a fake clock, and in-flight byte gauges."""

from __future__ import annotations

import logging

import pytest

from dept_comm.frames import ChunkFrame, StreamItem
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.progress import InflightTransfers, IntervalGate, TransferProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def open_msg(num_tensors: int, payload_bytes: int = 0) -> pb.StreamMessage:
    return pb.StreamMessage(
        open=pb.StreamOpen(upload_id="u", num_tensors=num_tensors, payload_bytes=payload_bytes)
    )


def chunk(seq: int, tensor_idx: int, n: int) -> ChunkFrame:
    return ChunkFrame.build(
        upload_id="", seq=seq, tensor_idx=tensor_idx, chunk_idx=1, header=None, data=bytes(n)
    )


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("transfer_progress")]


def test_push_progress_logs_done_total_rate_and_eta_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dept_comm.progress")
    clock = FakeClock()
    msgs: list[StreamItem] = [chunk(i, 0, 1_000_000 - 20) for i in range(4)]
    sizes = [m.ByteSize() for m in msgs]
    total = sum(sizes)
    progress = TransferProgress("push", total_bytes=total, interval_s=10.0, clock=clock)
    it = progress.wrap(msgs)

    clock.now += 9.9
    next(it)
    assert lines(caplog) == []  # before the interval: nothing
    clock.now += 0.1  # 10 s since the start
    next(it)
    done = sizes[0] + sizes[1]
    rate = done / 10.0
    assert progress.done == done
    assert progress.rate_bps() == pytest.approx(rate)
    assert progress.eta_s() == pytest.approx((total - done) / rate)
    assert lines(caplog) == [
        f"transfer_progress direction=push done={done} total={total} rate_MBps={rate / 1e6:.2f} "
        f"eta_s={(total - done) / rate:.0f}"  # no open passed: no tensor count
    ]
    clock.now += 5.0
    next(it)  # 5 s after the last line: none
    assert len(lines(caplog)) == 1
    clock.now += 5.0
    next(it)
    assert len(lines(caplog)) == 2
    assert progress.eta_s() == 0.0
    assert list(it) == []


def test_pull_progress_has_no_total_or_eta_and_counts_tensors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dept_comm.progress")
    clock = FakeClock()
    progress = TransferProgress("pull", interval_s=1.0, clock=clock)
    msgs: list[StreamItem] = [open_msg(5), chunk(0, 0, 100), chunk(1, 2, 400)]
    for _ in progress.wrap(msgs):  # each message is counted as it arrives: at 0, 0.5 and 1.0 s
        clock.now += 0.5
    assert progress.eta_s() is None
    [line] = lines(caplog)  # at 1.0 s, on the last message
    assert line.startswith(f"transfer_progress direction=pull done={progress.done} total=unknown ")
    assert line.endswith(" eta_s=unknown tensors=3/5")


def test_a_pull_whose_open_announces_its_bytes_has_a_total_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dept_comm.progress")
    clock = FakeClock()
    progress = TransferProgress("pull", interval_s=1.0, clock=clock)
    msgs: list[StreamItem] = [open_msg(5, payload_bytes=2000), chunk(0, 0, 100), chunk(1, 2, 400)]
    for _ in progress.wrap(msgs):
        clock.now += 0.5
    assert progress.total_bytes == 2000
    eta = progress.eta_s()
    assert eta is not None and eta == pytest.approx((2000 - progress.done) / progress.rate_bps())
    [line] = lines(caplog)  # logged at 1.0 s, on the last message: rate = done / 1.0 s
    at_line = (2000 - progress.done) / (progress.done / 1.0)
    assert " total=2000 " in line and f" eta_s={at_line:.0f} " in line and line.endswith(" tensors=3/5")


def test_a_transfer_shorter_than_the_interval_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dept_comm.progress")
    clock = FakeClock()
    progress = TransferProgress("pull", interval_s=10.0, clock=clock)
    for _ in progress.wrap([open_msg(1), chunk(0, 0, 10_000)]):
        clock.now += 4.0
    assert progress.done > 10_000
    assert lines(caplog) == []


def test_interval_gate_refuses_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        IntervalGate(0.0)


def test_inflight_bytes_rise_as_messages_pass_and_leave_when_the_stream_ends() -> None:
    inflight = InflightTransfers()
    msgs = [chunk(i, 0, 1000) for i in range(3)]
    tracked = inflight.track("push", msgs)
    next(tracked)
    next(tracked)
    assert inflight.snapshot() == {"pull": (0, 0), "push": (msgs[0].ByteSize() + msgs[1].ByteSize(), 1)}
    text = inflight.prometheus_text()
    assert f"dept_inflight_push_bytes {msgs[0].ByteSize() + msgs[1].ByteSize()}\n" in text
    assert 'dept_inflight_streams{direction="push"} 1\n' in text
    assert "dept_inflight_pull_bytes 0\n" in text
    tracked.close()  # a stream cut mid-way
    assert inflight.snapshot() == {"pull": (0, 0), "push": (0, 0)}
    assert list(inflight.track("pull", msgs)) == msgs
    assert inflight.snapshot()["pull"] == (0, 0)
