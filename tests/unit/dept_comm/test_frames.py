"""Chunk frames: the same bytes as protobuf, read in place, and protobuf's verdict on anything else."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from dept_comm.accounting import ByteMeter, metered
from dept_comm.errors import MalformedMessageError
from dept_comm.frames import (
    ChunkFrame,
    Undecodable,
    as_message,
    chunk_checksum,
    from_wire,
    read_wire,
    to_wire,
)
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.streaming import StreamReceiver, receive_stream

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


@st.composite
def headers(draw):
    if not draw(st.booleans()):
        return None
    return pb.TensorHeader(
        name=draw(st.text(max_size=12)),
        shape=draw(st.lists(st.integers(0, 1 << 40), max_size=4)),
        dtype=draw(st.sampled_from([0, 1, 2, 4])),
        codec=draw(st.sampled_from(["", "fp32", "int8"])),
        raw_bytes=draw(st.integers(0, U64)),
        encoded_bytes=draw(st.integers(0, U64)),
        num_chunks=draw(st.integers(0, U32)),
        digest=draw(st.binary(max_size=16)),
    )


@st.composite
def chunks(draw):
    return {
        "upload_id": draw(st.text(max_size=20)),
        "seq": draw(st.integers(0, U64)),
        "tensor_idx": draw(st.integers(0, U32)),
        "chunk_idx": draw(st.integers(0, U32)),
        "header": draw(headers()),
        "data": draw(st.binary(max_size=3000)),
    }


def _message(fields, checksum):
    m = pb.StreamMessage()
    c = m.chunk
    c.upload_id, c.seq, c.tensor_idx, c.chunk_idx = (
        fields["upload_id"],
        fields["seq"],
        fields["tensor_idx"],
        fields["chunk_idx"],
    )
    if fields["header"] is not None:
        c.header.CopyFrom(fields["header"])
    c.data = fields["data"]
    c.checksum = checksum
    return m


def _facts(item):
    """The chunk's fields, from a frame or from a protobuf message alike."""
    if isinstance(item, ChunkFrame):
        c, header = item, item.header
    else:
        assert item.WhichOneof("kind") == "chunk"
        c = item.chunk
        header = c.header if c.HasField("header") else None
    return (c.upload_id, c.seq, c.tensor_idx, c.chunk_idx, header, bytes(c.data), c.checksum)


def _same_verdict(wire: bytes) -> None:
    """from_wire accepts exactly what protobuf accepts, with the same content."""
    try:
        expected = pb.StreamMessage.FromString(wire)
    except DecodeError:
        with pytest.raises(DecodeError):
            from_wire(wire)
        return
    got = from_wire(wire)
    if expected.WhichOneof("kind") == "chunk":
        assert _facts(got) == _facts(expected)
    else:
        assert not isinstance(got, ChunkFrame) and got == expected


@settings(max_examples=200, deadline=None)
@given(fields=chunks())
def test_build_writes_protobufs_bytes_and_reads_back(fields):
    frame = ChunkFrame.build(**fields)
    assert frame.checksum == chunk_checksum(fields["data"])
    assert frame.wire == _message(fields, frame.checksum).SerializeToString()
    assert to_wire(frame) is frame.wire and frame.ByteSize() == len(frame.wire)
    assert bytes(frame.data) == fields["data"]

    read = from_wire(frame.wire)
    assert isinstance(read, ChunkFrame)
    assert _facts(read) == _facts(frame) == _facts(as_message(frame))
    if fields["data"]:
        assert read.data.obj is frame.wire  # a view into the received bytes, not a copy


def test_build_takes_a_tensor_view_and_a_given_checksum():
    payload = memoryview(bytes(range(256)) * 16)
    frame = ChunkFrame.build(
        upload_id="u", seq=1, tensor_idx=0, chunk_idx=1, header=None, data=payload[1024:2048], checksum=7
    )
    assert frame.checksum == 7 and bytes(frame.data) == bytes(payload[1024:2048])
    assert as_message(frame).chunk.checksum == 7


@settings(max_examples=150, deadline=None)
@given(fields=chunks(), data=st.data())
def test_any_corruption_gets_protobufs_verdict(fields, data):
    wire = bytearray(ChunkFrame.build(**fields).wire)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    _same_verdict(bytes(wire))


def test_every_truncation_gets_protobufs_verdict():
    fields = {
        "upload_id": "up-é",
        "seq": 300,
        "tensor_idx": 2,
        "chunk_idx": 0,
        "header": pb.TensorHeader(name="w", shape=[2, 3], num_chunks=1, digest=b"d" * 16),
        "data": bytes(range(200)),
    }
    wire = ChunkFrame.build(**fields).wire
    for n in range(len(wire)):
        _same_verdict(wire[:n])


def _tag(field: int, wire_type: int) -> bytes:
    return bytes([(field << 3) | wire_type])


def _outer(inner: bytes) -> bytes:
    assert len(inner) < 128
    return b"\x0a" + bytes([len(inner)]) + inner


@pytest.mark.parametrize(
    "inner",
    [
        _tag(2, 0) + b"\x05" + _tag(6, 2) + b"\x03abc" + _tag(2, 0) + b"\x07",  # seq twice: last wins
        _tag(5, 2) + b"\x03\x0a\x01a" + _tag(5, 2) + b"\x02\x18\x01",  # header twice: merged
        _tag(15, 0) + b"\x01" + _tag(6, 2) + b"\x01z",  # an unknown field
        _tag(7, 0) + b"\x09" + _tag(6, 2) + b"\x01z",  # the retired crc32c field
        _tag(3, 0) + b"\xff\xff\xff\xff\x1f",  # a uint32 past 2**32 (protobuf truncates)
        _tag(6, 2) + b"\x02hi" + _tag(2, 0) + b"\x01",  # fields out of order
        _tag(1, 2) + b"\x02\xff\xfe",  # upload_id that is not UTF-8
        b"",  # an empty chunk
    ],
)
def test_non_canonical_chunks_read_as_protobuf_reads_them(inner):
    _same_verdict(_outer(inner))


def test_open_commit_and_trailing_fields_go_to_protobuf():
    opened = pb.StreamMessage(open=pb.StreamOpen(upload_id="u", num_tensors=2))
    commit = pb.StreamMessage(commit=pb.Commit(upload_id="u", num_chunks=3, digest=b"x" * 16))
    for msg in (opened, commit):
        got = from_wire(msg.SerializeToString())
        assert not isinstance(got, ChunkFrame) and got == msg
        assert to_wire(msg) == msg.SerializeToString()
    chunk_then_commit = (
        ChunkFrame.build(upload_id="u", seq=0, tensor_idx=0, chunk_idx=0, header=None, data=b"abc").wire
        + commit.SerializeToString()
    )
    _same_verdict(chunk_then_commit)  # a oneof: the last member set wins
    assert from_wire(chunk_then_commit).WhichOneof("kind") == "commit"  # type: ignore[union-attr]


def test_read_wire_hands_on_what_protobuf_rejects_and_the_receiver_refuses_it():
    good = ChunkFrame.build(upload_id="u", seq=0, tensor_idx=0, chunk_idx=0, header=None, data=b"abc")
    assert isinstance(read_wire(good.wire), ChunkFrame)
    bad = read_wire(good.wire[:-3])
    assert isinstance(bad, Undecodable) and bad.ByteSize() == len(good.wire) - 3
    rx = StreamReceiver()
    with pytest.raises(MalformedMessageError, match="not a StreamMessage"):
        rx.add(bad)
    with pytest.raises(MalformedMessageError):
        receive_stream([bad])
    meter = ByteMeter()
    list(metered([bad], meter))
    assert meter.by_group()["control"].payload_bytes == len(good.wire) - 3
