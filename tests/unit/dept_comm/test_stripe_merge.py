"""dept_comm.stripe_merge: stripes of a real encoded stream, fed from one thread each, reach a real
decoding sink (PullReceiver) in seq order, with at most ``window`` chunks held in between."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from dept_comm.codecs import get_codec
from dept_comm.digest import tensors_digest
from dept_comm.errors import StreamOrderError
from dept_comm.frames import WireItem, chunk_of, kind_of
from dept_comm.manifest import MIN_CHUNK_BYTES
from dept_comm.parallel import StripeMismatchError
from dept_comm.pb import service_pb2
from dept_comm.sending import StreamConfig, StreamOpenInfo, encode_stream
from dept_comm.streaming import PULL_LIMITS, PullReceiver
from dept_comm.stripe_merge import PullSink, pull_striped_into

REQUEST = service_pb2.PullRequest(worker_id="w", full=True)


def _body(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(3 * MIN_CHUNK_BYTES // 4 + i, generator=gen) for i in range(5)}


def _stream(body: dict[str, torch.Tensor], version: int) -> list[WireItem]:
    info = StreamOpenInfo(
        upload_id=f"pull-v{version}", target_version=version, target_digest=tensors_digest(body)
    )
    config = StreamConfig(chunk_bytes=MIN_CHUNK_BYTES)
    return list(encode_stream(body, open_info=info, codec=get_codec("fp32"), config=config))


def _stripe(stream: list[WireItem], index: int, count: int) -> list[WireItem]:
    chunks = [m for m in stream[1:-1] if chunk_of(m).seq % count == index]  # type: ignore[union-attr]
    return [stream[0], *chunks, stream[-1]]


class Recording:
    """A PullReceiver that also records the seqs it was handed and its restarts."""

    def __init__(self) -> None:
        self.rx = PullReceiver(limits=PULL_LIMITS)
        self.seqs: list[int] = []
        self.kinds: list[str] = []
        self.restarts = 0

    def add(self, msg: WireItem) -> None:
        self.kinds.append(kind_of(msg))
        chunk = chunk_of(msg)
        if chunk is not None:
            self.seqs.append(chunk.seq)
        self.rx.add(msg)

    def restart(self) -> None:
        self.restarts += 1
        self.seqs.clear()
        self.kinds.clear()
        self.rx.restart()


def _feeder(stripes, *, before=None):
    """pull_one over prepared stripes; ``before(index, position)`` runs before each message."""

    def pull_one(request: service_pb2.PullRequest, into: PullSink) -> None:
        for position, msg in enumerate(stripes[request.stream_index]):
            if before is not None:
                before(request.stream_index, position)
            into.add(msg)

    return pull_one


@pytest.mark.parametrize("count", [2, 3, 5])
def test_stripes_arriving_in_any_interleaving_reach_the_sink_in_seq_order(count):
    body = _body(0)
    stream = _stream(body, 1)
    n = len(stream) - 2
    stripes = [_stripe(stream, i, count) for i in range(count)]
    rng = random.Random(count)
    sink = Recording()
    got = pull_striped_into(
        _feeder(stripes, before=lambda i, p: time.sleep(rng.random() * 0.002)), REQUEST, count, sink, window=4
    )
    assert [kind_of(m) for m in got] == ["open", "commit"]  # no chunk is held besides the sink's
    assert sink.seqs == list(range(n))
    assert sink.kinds[0] == "open" and sink.kinds[-1] == "commit" and sink.kinds.count("open") == 1
    info, tensors = sink.rx.result()
    assert tensors_digest(tensors) == tensors_digest(body) == info.target_digest


def test_a_stripe_far_ahead_waits_and_the_merger_holds_at_most_its_window():
    stream = _stream(_body(1), 1)
    stripes = [_stripe(stream, i, 2) for i in range(2)]
    late = threading.Event()
    handed = [0, 0]

    def before(index: int, position: int) -> None:
        if index == 0 and position == 2:  # stripe 0 stalls after its open and first chunk
            assert late.wait(10)
        handed[index] = position

    sink = Recording()
    merged = threading.Thread(
        target=pull_striped_into,
        args=(_feeder(stripes, before=before), REQUEST, 2, sink),
        kwargs={"window": 3},
    )
    merged.start()
    deadline = time.monotonic() + 10
    while handed[1] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time to go further, if it could
    # Seq 2 (stripe 0's) is due; stripe 1 handed on seq 1 and seq 3 (waiting in the merger) and
    # waits with seq 5, a window of 3 past seq 2.
    assert sink.seqs == [0, 1]
    assert handed[1] == 3, handed
    late.set()
    merged.join(10)
    assert not merged.is_alive()
    assert sink.seqs == list(range(len(stream) - 2))
    sink.rx.result()


def test_a_failing_stripe_stops_the_waiting_ones_and_its_error_is_raised():
    stream = _stream(_body(2), 1)
    stripes = [_stripe(stream, i, 3) for i in range(3)]

    def before(index: int, position: int) -> None:
        if index == 0 and position == 2:
            time.sleep(0.2)  # the others run ahead into the window meanwhile
            raise ConnectionResetError("stripe 0 lost its link")

    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError, match="stripe 0 lost its link"):
        pull_striped_into(_feeder(stripes, before=before), REQUEST, 3, Recording(), window=2)
    assert time.monotonic() - t0 < 5  # the waiting stripes did not hang


def test_stripes_of_different_streams_start_the_pull_again_into_a_restarted_sink():
    old, new = _body(3), _body(4)
    old_stream, new_stream = _stream(old, 1), _stream(new, 2)
    attempts = []

    def pull_one(request: service_pb2.PullRequest, into: PullSink) -> None:
        attempts.append(request.stream_index)
        first_try = len(attempts) <= 2
        # On the first try stripe 1 already sees the next version (a round closed in between).
        stream = old_stream if first_try and request.stream_index == 0 else new_stream
        for msg in _stripe(stream, request.stream_index, 2):
            into.add(msg)

    sink = Recording()
    pull_striped_into(pull_one, REQUEST, 2, sink)
    assert sink.restarts == 1 and len(attempts) == 4
    info, tensors = sink.rx.result()
    assert info.target_version == 2 and tensors_digest(tensors) == tensors_digest(new)


def test_stripes_that_keep_disagreeing_fail_after_the_attempts():
    streams = [_stream(_body(5), 1), _stream(_body(6), 2)]

    def pull_one(request: service_pb2.PullRequest, into: PullSink) -> None:
        for msg in _stripe(streams[request.stream_index], request.stream_index, 2):
            into.add(msg)

    sink = Recording()
    with pytest.raises(StripeMismatchError):
        pull_striped_into(pull_one, REQUEST, 2, sink, attempts=2)
    assert sink.restarts == 2


def _skip_seq_2(stripes: list[list[WireItem]]) -> None:
    del stripes[0][2]  # stripe 0 never sends seq 2 (its second chunk)


def _end_stripe_0_after_seq_2(stripes: list[list[WireItem]]) -> None:
    stripes[0][3:] = []  # stripe 0 ends after seq 2 (no more chunks, no commit)


def _seq_1_in_stripe_0(stripes: list[list[WireItem]]) -> None:
    stripes[0].insert(2, stripes[1][1])


@pytest.mark.parametrize(
    ("spoil", "refusal"),
    [
        (_skip_seq_2, "skipped chunk seq=2"),
        (_end_stripe_0_after_seq_2, "stripe 0 ended without chunk seq=4"),
        (_seq_1_in_stripe_0, "stripe 0 of 2 carried chunk seq=1"),
    ],
    ids=["skipped-chunk", "ended-early", "wrong-stripe"],
)
def test_a_stripe_out_of_its_order_fails_the_pull_instead_of_hanging_it(spoil, refusal):
    """A stripe that skips a chunk, ends while the others wait for one of its chunks, or carries
    another stripe's seq: the pull fails with what went wrong, at once."""
    stream = _stream(_body(10), 1)
    stripes = [_stripe(stream, i, 2) for i in range(2)]
    spoil(stripes)
    t0 = time.monotonic()
    with pytest.raises(StreamOrderError, match=refusal):
        pull_striped_into(_feeder(stripes), REQUEST, 2, Recording(), window=2)
    assert time.monotonic() - t0 < 5
