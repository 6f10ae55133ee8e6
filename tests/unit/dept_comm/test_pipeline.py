"""dept_comm.pipeline: a pipelined upload is the sequential one, byte for byte; receivers that check
or decode on arrival give what checking or decoding at the end gives."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dept_comm.codecs import get_codec
from dept_comm.codecs.feedback import ErrorFeedback
from dept_comm.errors import NonFiniteError, StreamOrderError
from dept_comm.frames import StreamItem, as_message, kind_of, to_wire
from dept_comm.pipeline import PipelinedUpload
from dept_comm.staging import StagingArea
from dept_comm.streaming import PullReceiver, StreamConfig, StreamOpenInfo, StreamReceiver, encode_stream

CHUNK = 4 << 10


def deltas(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(17 + 900 * i, generator=gen) * 0.01 for i in range(6)}


def stream(
    tensors: dict[str, torch.Tensor], feedback: ErrorFeedback | None, codec: str = "int4"
) -> Iterator[StreamItem]:
    info = StreamOpenInfo(upload_id="u-1", sender_id="w", is_delta=True)
    encoder = (lambda name, t, c: feedback.encode(name, t)) if feedback is not None else None
    return encode_stream(
        tensors,
        open_info=info,
        codec=get_codec(codec),
        config=StreamConfig(chunk_bytes=CHUNK),
        encoder=encoder,
    )


def test_pipelined_upload_is_the_sequential_one_byte_for_byte_and_leaves_the_same_feedback() -> None:
    sequential, pipelined = ErrorFeedback(get_codec("int4")), ErrorFeedback(get_codec("int4"))
    for round_idx in range(3):  # the residuals carry over: later rounds depend on earlier ones
        expected = list(stream(deltas(round_idx), sequential))
        upload = PipelinedUpload(stream(deltas(round_idx), pipelined))
        followed = list(upload.follow())
        assert [to_wire(m) for m in followed] == [to_wire(m) for m in expected[:-1]]
        assert [to_wire(m) for m in upload] == [to_wire(m) for m in expected[:-1]]
        assert upload.commit == as_message(expected[-1]).commit
        assert kind_of(upload[0]) == "open" and len(upload) == len(expected) - 1
        state_s, state_p = sequential.state_dict(), pipelined.state_dict()
        assert state_s.keys() == state_p.keys()
        assert all(torch.equal(state_s[k], state_p[k]) for k in state_s)


def test_an_encoder_error_ends_the_follow_and_is_raised_by_wait() -> None:
    def failing() -> Iterator[StreamItem]:
        items = stream(deltas(0), None)
        yield next(items)
        raise ValueError("boom")

    upload = PipelinedUpload(failing())
    assert [kind_of(m) for m in upload.follow()] == ["open"]
    with pytest.raises(ValueError, match="boom"):
        upload.wait()
    with pytest.raises(ValueError, match="boom"):
        len(upload)


def receiver(messages: list[StreamItem], **options: object) -> StreamReceiver:
    rx = StreamReceiver(**options)  # type: ignore[arg-type]
    for m in messages:
        rx.add(m)
    return rx


def test_checks_on_arrival_give_the_norm_the_commit_check_gives() -> None:
    messages = list(stream(deltas(5), None))
    plain = receiver(messages)
    arriving = receiver(messages, check_on_arrival=True)
    assert plain.checked_on_arrival == 0 and arriving.checked_on_arrival == len(deltas(5))
    assert plain.validate() == arriving.validate() > 0
    # Tensors not checked on arrival (e.g. one whose check had not run) are checked at the commit.
    partial = receiver(messages, check_on_arrival=True)
    partial._checks._results.pop(2)  # type: ignore[union-attr]
    partial._checks._results.pop(4)  # type: ignore[union-attr]
    assert partial.validate() == plain.validate()
    # The staged bytes stay for the fold, which decodes what the sequential path decodes.
    got = dict(arriving.named_tensors())
    want = dict(plain.named_tensors())
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_checks_on_an_executor_run_off_the_receiving_thread_and_give_the_same_norm() -> None:
    messages = list(stream(deltas(5), None))
    plain = receiver(messages).validate()
    slots = threading.BoundedSemaphore(1)
    with ThreadPoolExecutor(1, thread_name_prefix="check") as pool:
        ran_on: set[str] = set()
        rx = StreamReceiver(check_on_arrival=True, check_slots=slots, check_executor=pool)
        real_run = rx._checks.run  # type: ignore[union-attr]

        def run(*args: object) -> None:
            ran_on.add(threading.current_thread().name)
            real_run(*args)  # type: ignore[arg-type]

        rx._checks.run = run  # type: ignore[union-attr,method-assign]
        for m in messages:
            rx.add(m)
        rx.settle_checks()
        assert rx.checked_on_arrival == len(deltas(5))
        assert ran_on and all(name.startswith("check") for name in ran_on)
        assert rx.validate() == plain
        # Every slot is free again once the checks ended.
        assert slots.acquire(blocking=False)


def test_discard_waits_for_the_checks_reading_the_staged_bytes() -> None:
    messages = list(stream(deltas(6), None, codec="int8"))  # int8: every check goes to the pool
    gate = threading.Event()
    slots = threading.BoundedSemaphore(1)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(gate.wait)  # the checks queue behind this
        rx = StreamReceiver(check_on_arrival=True, check_slots=slots, check_executor=pool)
        for m in messages:
            rx.add(m)
        assert rx.checked_on_arrival == 0  # queued, not run
        done = threading.Event()
        threading.Thread(target=lambda: (rx.discard(), done.set()), daemon=True).start()
        assert not done.wait(0.2)  # discard waits for the queued checks
        gate.set()
        assert done.wait(10)
    with pytest.raises(StreamOrderError):
        rx.validate()


def test_a_nan_tensor_is_refused_at_validate_with_or_without_arrival_checks() -> None:
    tensors = deltas(1)
    tensors["t3"] = torch.full_like(tensors["t3"], math.nan)
    messages = list(stream(tensors, None, codec="fp32"))
    for options in ({}, {"check_on_arrival": True}):
        rx = receiver(messages, **options)  # arrival records the error, raises nothing
        with pytest.raises(NonFiniteError, match="t3"):
            rx.validate()


def test_pull_receiver_decodes_on_arrival_and_returns_what_decoding_at_the_end_returns() -> None:
    messages = list(stream(deltas(2), None))
    rx = PullReceiver()
    for m in messages[:-1]:
        rx.add(m)
    assert len(rx._rx._decoded) == len(deltas(2))  # every tensor decoded before the commit came
    rx.add(messages[-1])
    info, got = rx.result()
    plain = receiver(messages)
    want = plain.decode_all()
    assert info.upload_id == "u-1" and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # Another stream after a restart: what was held is gone.
    rx.restart()
    other = list(stream(deltas(3), None))
    for m in other:
        rx.add(m)
    again, expected = rx.result()[1], receiver(other).decode_all()
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_squared_norm_matches_a_float64_norm() -> None:
    """The outlier guard's norm: float32 dot products per block, summed in float64."""
    from dept_comm.pipeline import squared_norm

    gen = torch.Generator().manual_seed(3)
    for n in (0, 1, 65_535, 65_536, 300_001):
        t = torch.randn(n, generator=gen) * 1e-3
        want = float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
        assert squared_norm(t) == pytest.approx(want, rel=1e-6, abs=1e-30)
    assert squared_norm(torch.arange(10)) == 0.0  # index tensors count nothing
    half = torch.randn(1000, generator=gen).to(torch.bfloat16)
    assert squared_norm(half) == pytest.approx(float(half.double().square().sum()), rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_squared_norm_finds_a_non_finite_value_in_the_same_pass(bad: float) -> None:
    from dept_comm.pipeline import squared_norm

    t = torch.randn(200_000)
    t[123_457] = bad
    with pytest.raises(NonFiniteError, match=r"'w\.0' has 1 non-finite values of 200000"):
        squared_norm(t, require_finite=True, name="w.0")
    assert not math.isfinite(squared_norm(t))  # not asked to check: the norm says it
    with pytest.raises(NonFiniteError, match="3 non-finite"):
        squared_norm(torch.tensor([1.0, bad, bad, bad]).to(torch.bfloat16), require_finite=True)


def test_squared_norm_of_finite_values_past_float32_squares_is_exact() -> None:
    """1e20 squared overflows float32; every value is finite, so the norm is taken in float64."""
    from dept_comm.pipeline import squared_norm

    t = torch.full((100_000,), 1e20)
    t[::2] = -3e25
    want = float(t.double().square().sum())
    assert math.isfinite(want)
    assert squared_norm(t, require_finite=True) == pytest.approx(want, rel=1e-9)


BLOCK_BYTES = 256 << 10  # squared_norm's block: 64 Ki float32


def fp32_stream(tensors: dict[str, torch.Tensor], chunk_bytes: int) -> list[StreamItem]:
    info = StreamOpenInfo(upload_id="u-2", sender_id="w", is_delta=True)
    config = StreamConfig(chunk_bytes=chunk_bytes)
    return list(encode_stream(tensors, open_info=info, codec=get_codec("fp32"), config=config))


def big_deltas(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)  # one, two and three chunks of 256 KiB, last ones partial
    sizes = (1000, 64 << 10, (64 << 10) + 5, (160 << 10) + 3)
    return {f"t{i}": torch.randn(n, generator=gen) * 0.01 for i, n in enumerate(sizes)}


class NoPool(ThreadPoolExecutor):
    def submit(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def,override]
        raise AssertionError("a float32 tensor cut at block boundaries needs no check of its own")


@pytest.mark.parametrize("spilled", [False, True])
def test_float32_squares_taken_chunk_by_chunk_give_the_whole_pass_norm_bit_for_bit(tmp_path, spilled) -> None:
    """Chunks cut at squared_norm's block boundaries: each chunk's squares are taken as it is
    staged, and the tensor's check adds them up, the same float64 additions in the same order as
    the whole pass at the commit (equal, not close). Spilled to files, the whole pass runs."""
    messages = fp32_stream(big_deltas(7), BLOCK_BYTES)
    plain = receiver(messages)
    staging = StagingArea(tmp_path, 0).upload() if spilled else None
    with NoPool(1) if not spilled else ThreadPoolExecutor(1) as pool:
        rx = receiver(messages, check_on_arrival=True, check_executor=pool, staging=staging)
        rx.settle_checks()
    assert rx._checks.by_chunk == (0 if spilled else len(big_deltas(7)))  # type: ignore[union-attr]
    assert rx.checked_on_arrival == len(big_deltas(7))
    assert rx.validate() == plain.validate() > 0
    got = dict(rx.named_tensors())
    assert all(torch.equal(got[k], t) for k, t in big_deltas(7).items())


def test_chunks_off_the_block_boundaries_are_checked_whole() -> None:
    messages = fp32_stream(big_deltas(8), 100 << 10)  # 100 KiB: not a whole number of blocks
    rx = receiver(messages, check_on_arrival=True)
    assert rx._checks.by_chunk == 1  # type: ignore[union-attr]  # only the one-chunk tensor
    assert rx.validate() == receiver(messages).validate()


def test_nan_and_float32_overflow_go_the_whole_way_from_chunk_squares() -> None:
    tensors = big_deltas(9)
    tensors["t2"][65_538] = math.nan  # in its second chunk
    messages = fp32_stream(tensors, BLOCK_BYTES)
    rx = receiver(messages, check_on_arrival=True)
    with pytest.raises(NonFiniteError, match="t2"):
        rx.validate()
    # Every value finite but squares past float32's range: summed again in float64, as whole.
    tensors = big_deltas(9)
    tensors["t3"] *= 1e20
    messages = fp32_stream(tensors, BLOCK_BYTES)
    rx = receiver(messages, check_on_arrival=True)
    assert rx._checks.by_chunk == 3  # type: ignore[union-attr]
    norm = rx.validate()
    assert math.isfinite(norm) and norm == receiver(messages).validate() > 1e20
