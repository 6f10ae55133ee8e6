"""Chunk messages written and read by hand, so a payload is copied once per side instead of four times.

A ``dept.v1.StreamMessage`` carrying a ``TensorChunk`` is almost all payload. Through protobuf, the
sender copies that payload into the message and again into the serialized bytes, and the receiver
copies it into the parsed message and again when it reads ``data``. A :class:`ChunkFrame` holds
the serialized message itself (``wire``) and exposes ``data`` as a view into it: the sender builds
``wire`` with one join, the receiver reads the fields in place. The bytes are exactly what protobuf
writes for the same message (a test holds the two equal), so either end may use plain protobuf.

:func:`from_wire` reads only the canonical encoding of a chunk; anything else (open and commit
messages, unknown fields, repeated headers, malformed bytes) goes to protobuf's own parser, so the
result never differs from what protobuf would accept or reject.
"""

from __future__ import annotations

from typing import Final

import xxhash
from google.protobuf.message import DecodeError

from dept_comm.pb import tensor_pb2 as pb

Buffer = bytes | bytearray | memoryview  # collections.abc.Buffer is Python 3.12+

__all__ = [
    "Buffer",
    "ChunkFrame",
    "StreamItem",
    "Undecodable",
    "WireItem",
    "as_message",
    "chunk_checksum",
    "chunk_of",
    "header_of",
    "kind_of",
    "from_wire",
    "read_wire",
    "to_wire",
]

# Wire tags: (field number << 3) | wire type; 0 = varint, 1 = 64-bit, 2 = length-delimited.
_MSG_CHUNK: Final = 0x0A  # StreamMessage.chunk = 1
_UPLOAD_ID: Final = 0x0A  # TensorChunk.upload_id = 1
_SEQ: Final = 0x10  # TensorChunk.seq = 2
_TENSOR_IDX: Final = 0x18  # TensorChunk.tensor_idx = 3
_CHUNK_IDX: Final = 0x20  # TensorChunk.chunk_idx = 4
_HEADER: Final = 0x2A  # TensorChunk.header = 5
_DATA: Final = 0x32  # TensorChunk.data = 6
_CHECKSUM: Final = 0x41  # TensorChunk.checksum = 8 (fixed64)
_U32: Final = 1 << 32
_U64: Final = 1 << 64


def chunk_checksum(data: Buffer) -> int:
    """XXH3-64 of a chunk's bytes: the ``TensorChunk.checksum`` of ``data``."""
    return xxhash.xxh3_64_intdigest(data)


class ChunkFrame:
    """One ``StreamMessage`` holding a ``TensorChunk``: its fields and its serialized bytes.

    ``data`` is a read-only view into ``wire``; ``header`` is set iff the chunk carries one.
    Attribute names follow ``pb.TensorChunk``.
    """

    __slots__ = ("upload_id", "seq", "tensor_idx", "chunk_idx", "header", "data", "checksum", "wire")

    def __init__(
        self,
        *,
        upload_id: str,
        seq: int,
        tensor_idx: int,
        chunk_idx: int,
        header: pb.TensorHeader | None,
        data: memoryview,
        checksum: int,
        wire: bytes,
    ) -> None:
        self.upload_id = upload_id
        self.seq = seq
        self.tensor_idx = tensor_idx
        self.chunk_idx = chunk_idx
        self.header = header
        self.data = data
        self.checksum = checksum
        self.wire = wire

    @classmethod
    def build(
        cls,
        *,
        upload_id: str,
        seq: int,
        tensor_idx: int,
        chunk_idx: int,
        header: pb.TensorHeader | None,
        data: Buffer,
        checksum: int | None = None,
    ) -> ChunkFrame:
        """Serialize a chunk of ``data`` (any buffer, e.g. a view of a tensor) with one copy.

        ``checksum`` is ``chunk_checksum(data)``, computed here unless the caller already has it.
        """
        view = memoryview(data).cast("B")
        if checksum is None:
            checksum = chunk_checksum(view)
        head = bytearray()
        if upload_id:
            _put_bytes(head, _UPLOAD_ID, upload_id.encode())
        _put_uint(head, _SEQ, seq)
        _put_uint(head, _TENSOR_IDX, tensor_idx)
        _put_uint(head, _CHUNK_IDX, chunk_idx)
        if header is not None:
            _put_bytes(head, _HEADER, header.SerializeToString())
        n = len(view)
        if n:
            head.append(_DATA)
            _put_varint(head, n)
        tail = bytearray()
        if checksum:  # proto3: zero scalars are not written
            tail.append(_CHECKSUM)
            tail += checksum.to_bytes(8, "little")
        body_len = len(head) + n + len(tail)
        outer = bytearray([_MSG_CHUNK])
        _put_varint(outer, body_len)
        start = len(outer) + len(head)
        wire = b"".join((outer, head, view, tail))
        return cls(
            upload_id=upload_id,
            seq=seq,
            tensor_idx=tensor_idx,
            chunk_idx=chunk_idx,
            header=header,
            data=memoryview(wire)[start : start + n],
            checksum=checksum,
            wire=wire,
        )

    def ByteSize(self) -> int:  # noqa: N802 - the protobuf method name, so meters treat both alike
        return len(self.wire)

    def to_pb(self) -> pb.StreamMessage:
        """A protobuf copy (for tests and tools; the stream path never needs one)."""
        return pb.StreamMessage.FromString(self.wire)

    def __repr__(self) -> str:
        return (
            f"ChunkFrame(upload_id={self.upload_id!r}, seq={self.seq}, tensor_idx={self.tensor_idx},"
            f" chunk_idx={self.chunk_idx}, header={self.header is not None}, bytes={len(self.data)})"
        )


StreamItem = pb.StreamMessage | ChunkFrame


class Undecodable:
    """Bytes that are no ``StreamMessage``, as :func:`read_wire` hands them on.

    The receiver refuses it with a clear error; gRPC never sees a failing deserializer (whose
    abort path, racing the handler, has left a grpcio server unable to shut down).
    """

    __slots__ = ("size", "reason")

    def __init__(self, size: int, reason: str) -> None:
        self.size, self.reason = size, reason

    def ByteSize(self) -> int:  # noqa: N802 - counted like any message
        return self.size

    def __repr__(self) -> str:
        return f"Undecodable(size={self.size}, reason={self.reason!r})"


WireItem = StreamItem | Undecodable


def to_wire(item: StreamItem) -> bytes:
    """gRPC serializer for stream messages: a frame's own bytes, else protobuf's."""
    if isinstance(item, ChunkFrame):
        return item.wire
    return item.SerializeToString()


def from_wire(wire: bytes) -> StreamItem:
    """gRPC deserializer for stream messages: chunks as frames read in place, the rest by protobuf.

    Raises:
        google.protobuf.message.DecodeError: bytes protobuf would reject.
    """
    frame = _read_chunk(wire)
    return frame if frame is not None else pb.StreamMessage.FromString(wire)


def read_wire(wire: bytes) -> WireItem:
    """gRPC deserializer for stream messages: :func:`from_wire`, with bytes it rejects handed on
    as :class:`Undecodable` (never raises)."""
    try:
        return from_wire(wire)
    except DecodeError as err:
        return Undecodable(len(wire), str(err))


def kind_of(item: WireItem) -> str:
    """``"open"``, ``"chunk"``, ``"commit"`` (or ``""`` for a message with none set); a frame is a
    chunk, and so are bytes that parsed as nothing (the receiver refuses them as malformed)."""
    if isinstance(item, (ChunkFrame, Undecodable)):
        return "chunk"
    return item.WhichOneof("kind") or ""


def chunk_of(item: WireItem) -> ChunkFrame | pb.TensorChunk | None:
    """The chunk an item carries (a frame is its own), or None for open, commit and undecodable bytes."""
    if isinstance(item, ChunkFrame):
        return item
    if isinstance(item, pb.StreamMessage) and item.WhichOneof("kind") == "chunk":
        return item.chunk
    return None


def header_of(chunk: ChunkFrame | pb.TensorChunk) -> pb.TensorHeader | None:
    """A chunk's tensor header, or None (protobuf reports an unset header as an empty message)."""
    if isinstance(chunk, ChunkFrame):
        return chunk.header
    return chunk.header if chunk.HasField("header") else None


def as_message(item: StreamItem) -> pb.StreamMessage:
    """``item`` as a protobuf ``StreamMessage`` (frames are parsed; messages returned as they are)."""
    return item.to_pb() if isinstance(item, ChunkFrame) else item


def _read_chunk(wire: bytes) -> ChunkFrame | None:
    """Read the canonical encoding of a chunk message; None for anything else."""
    end = len(wire)
    if end < 2 or wire[0] != _MSG_CHUNK:
        return None
    n, pos = _get_varint(wire, 1)
    if n is None or pos + n != end:  # malformed, or more fields after the chunk
        return None
    ints: dict[int, int] = {}
    spans: dict[int, tuple[int, int]] = {}
    while pos < end:
        tag = wire[pos]
        pos += 1
        if tag in ints or tag in spans:
            return None  # repeated field: protobuf's merge rules apply
        if tag in (_SEQ, _TENSOR_IDX, _CHUNK_IDX):
            value, pos = _get_varint(wire, pos)
            if value is None or value >= (_U64 if tag == _SEQ else _U32):
                return None
            ints[tag] = value
        elif tag == _CHECKSUM:
            if pos + 8 > end:
                return None
            ints[tag] = int.from_bytes(wire[pos : pos + 8], "little")
            pos += 8
        elif tag in (_UPLOAD_ID, _HEADER, _DATA):
            size, pos = _get_varint(wire, pos)
            if size is None or pos + size > end:
                return None
            spans[tag] = (pos, pos + size)
            pos += size
        else:
            return None  # unknown field or wire type: protobuf decides
    return _frame_from_fields(wire, ints, spans)


def _frame_from_fields(
    wire: bytes, ints: dict[int, int], spans: dict[int, tuple[int, int]]
) -> ChunkFrame | None:
    upload_id = ""
    if _UPLOAD_ID in spans:
        a, b = spans[_UPLOAD_ID]
        try:
            upload_id = wire[a:b].decode()
        except UnicodeDecodeError:
            return None
    header = None
    if _HEADER in spans:
        a, b = spans[_HEADER]
        header = pb.TensorHeader.FromString(wire[a:b])
    a, b = spans.get(_DATA, (0, 0))
    return ChunkFrame(
        upload_id=upload_id,
        seq=ints.get(_SEQ, 0),
        tensor_idx=ints.get(_TENSOR_IDX, 0),
        chunk_idx=ints.get(_CHUNK_IDX, 0),
        header=header,
        data=memoryview(wire)[a:b],
        checksum=ints.get(_CHECKSUM, 0),
        wire=wire,
    )


def _get_varint(buf: bytes, pos: int) -> tuple[int | None, int]:
    """(value, next position); value is None when the varint is truncated or over 10 bytes."""
    value = shift = 0
    end = min(len(buf), pos + 10)
    while pos < end:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    return None, pos


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_uint(out: bytearray, tag: int, value: int) -> None:
    if value:  # proto3: zero scalars are not written
        out.append(tag)
        _put_varint(out, value)


def _put_bytes(out: bytearray, tag: int, value: bytes) -> None:
    out.append(tag)
    _put_varint(out, len(value))
    out += value
