"""The sending side of a tensor stream: an open, each tensor's chunks with their checksums (the
first carrying the tensor's header), and a commit over every tensor's payload digest; and what
of an upload still has to go after a cut. ``dept_comm.streaming`` receives them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import xxhash

from dept_comm.codecs import Codec
from dept_comm.digest import Group
from dept_comm.frames import (
    ChunkFrame,
    StreamItem,
    chunk_of,
)
from dept_comm.manifest import (
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    Encoder,
    build_header,
    chunk_checksums,
    is_codec,
    tensor_payload,
)
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb

__all__ = ["CodecChoice", "StreamConfig", "StreamOpenInfo", "encode_stream", "unsent"]

CodecChoice = Codec | Callable[[str, torch.Tensor], Codec]


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamConfig:
    """How tensors are cut on the wire."""

    chunk_bytes: int = 1 << 20  # each message stays well under gRPC's 4 MiB default limit

    def __post_init__(self) -> None:
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [1 KiB, 2 MiB], got {self.chunk_bytes}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamOpenInfo:
    """Who sends a stream, for which round, and which state its tensors relate to."""

    upload_id: str
    sender_id: str = ""
    round_idx: int = 0
    base_version: int = 0
    base_digest: bytes = b""
    target_version: int = 0
    target_digest: bytes = b""
    is_delta: bool = False
    num_tensors: int = 0  # filled in by encode_stream
    payload_bytes: int = 0  # pulls: what the chunks carry in all, announced for progress (0: unknown)

    def to_pb(self) -> pb.StreamOpen:
        return pb.StreamOpen(**dataclasses.asdict(self))

    @classmethod
    def from_pb(cls, m: pb.StreamOpen) -> StreamOpenInfo:
        return cls(**{f.name: getattr(m, f.name) for f in dataclasses.fields(cls)})


def encode_stream(
    tensors: Mapping[str, torch.Tensor],
    *,
    open_info: StreamOpenInfo,
    codec: CodecChoice,
    groups: Group | Mapping[str, Group] = Group.BODY,
    config: StreamConfig = StreamConfig(),
    encoder: Encoder | None = None,
) -> Iterator[StreamItem]:
    """Yield the open message, every tensor's chunks, then the commit; lazily, one tensor at a time.

    Chunks come as :class:`~dept_comm.frames.ChunkFrame` (already serialized, one copy of the
    payload); open and commit as protobuf messages. Send them with ``dept_comm.frames.to_wire``.

    Memory: one encoded tensor at a time. For ``fp32``/``raw`` on contiguous CPU tensors the chunks
    are sliced from the tensor's own memory, so tensors must not change while the stream is consumed.

    Args:
        tensors: what to send, in this order.
        open_info: the stream's identity; ``num_tensors`` is set to ``len(tensors)``.
        codec: one codec for all tensors, or a function choosing one per tensor.
        groups: the accounting group of every tensor, or one per name.
        config: chunk size.
        encoder: replaces ``codec.encode`` (e.g. error feedback); gets (name, tensor, codec).

    Raises:
        ValueError: ``open_info.num_tensors`` disagrees with ``tensors``.
        ManifestMismatchError: a dtype with no wire representation.
        KeyError: a per-name ``groups`` mapping lacks a name.
    """
    if open_info.num_tensors not in (0, len(tensors)):
        raise ValueError(f"open_info.num_tensors={open_info.num_tensors} but {len(tensors)} tensors given")
    info = dataclasses.replace(open_info, num_tensors=len(tensors))
    upload_id = info.upload_id
    step = config.chunk_bytes
    stream_hash = xxhash.xxh3_128()
    seq = 0
    yield pb.StreamMessage(open=info.to_pb())
    for tensor_idx, (name, x) in enumerate(tensors.items()):
        group = groups if isinstance(groups, Group) else groups[name]
        c = codec if is_codec(codec) else codec(name, x)  # type: ignore[operator]
        payload = tensor_payload(name, x, c, encoder)
        checksums = chunk_checksums(payload, step)  # the one pass that hashes the payload
        header = build_header(name, x, c, payload, group, checksums)
        stream_hash.update(header.digest)  # the commit covers every tensor's payload digest
        view = memoryview(payload)
        for chunk_idx, checksum in enumerate(checksums):
            yield ChunkFrame.build(
                upload_id=upload_id,
                seq=seq,
                tensor_idx=tensor_idx,
                chunk_idx=chunk_idx,
                header=header if chunk_idx == 0 else None,
                data=view[chunk_idx * step : (chunk_idx + 1) * step],
                checksum=checksum,
            )
            seq += 1
        del view
        del payload
    commit = pb.Commit(
        upload_id=upload_id, num_chunks=seq, num_tensors=len(tensors), digest=stream_hash.digest()
    )
    yield pb.StreamMessage(commit=commit)


def unsent(messages: Sequence[StreamItem], receipt: service_pb2.PushReceipt) -> list[StreamItem]:
    """What of an upload still has to go after a cut: every message but the chunks ``receipt`` holds.

    ``receipt`` (from ``QueryUpload``) counts the chunks held and lists the missing seqs below the
    highest one held, so the held seqs are those below ``num_chunks + len(missing_seqs)`` that are
    not missing. The open (and a commit, if the sequence has one) always go again: both are
    idempotent on the receiver.
    """
    missing = set(receipt.missing_seqs)
    first_unseen = receipt.num_chunks + len(missing)

    def needed(m: StreamItem) -> bool:
        chunk = chunk_of(m)
        return chunk is None or chunk.seq >= first_unseen or chunk.seq in missing

    return [m for m in messages if needed(m)]
