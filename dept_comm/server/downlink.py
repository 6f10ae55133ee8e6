"""One version's down-link, encoded once and served to every pull without a lock or a copy.

At each round close (and at start or resume) the server builds a :class:`Downlink`: the shared
tensors of that version (never changed afterwards: the next round makes new tensors), the
encoded outer update that led to it as ready-made chunk frames, and the full body's headers and
chunk checksums. A pull streams

- a delta (worker one version behind): the update's frames, the very same objects for every
  worker (no encode, no hash, no copy per pull);
- a full body (first, resumed or fallback pulls): chunks sliced from the immutable fp32 tensors,
  their checksums computed once; each chunk is framed as it is sent (the one copy gRPC needs);
- with a row subset (DEPT TRIM's embeddings), after the rest, the worker's own rows of it and
  their ids (``emb.rows``, ``emb.ids``), encoded per pull.

Every stream of one kind and version has one upload id (``down-v<version>-<kind>``), so a cut
pull can ask to go on from a chunk (``PullRequest.resume_from_seq``): the server skips the chunks
before it when the id and target digest the worker names are still those it would send, and
sends the whole stream otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import torch
import xxhash

from dept_comm.codecs import Codec, get_codec
from dept_comm.digest import Group, tensors_digest
from dept_comm.frames import ChunkFrame, StreamItem
from dept_comm.manifest import build_header, chunk_checksums, tensor_payload
from dept_comm.names import EMB_IDS, EMB_ROWS
from dept_comm.parallel import in_stripe
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.streaming import StreamConfig, StreamOpenInfo

__all__ = ["Downlink", "EncodedTensor"]


@dataclass(frozen=True, slots=True)
class EncodedTensor:
    """One tensor of a down-link stream: its header, and its chunks either as ready frames
    (``frames``) or as an immutable payload with precomputed checksums (framed when sent)."""

    name: str
    header: pb.TensorHeader
    checksums: tuple[int, ...]
    frames: tuple[ChunkFrame, ...] | None = None
    payload: memoryview | None = None

    @property
    def num_chunks(self) -> int:
        return len(self.checksums)


def _encode(
    name: str, x: torch.Tensor, codec: Codec, payload: bytes | memoryview, step: int, group: Group
) -> tuple[pb.TensorHeader, list[int]]:
    checksums = chunk_checksums(payload, step)
    return build_header(name, x, codec, payload, group, checksums), checksums


def _frames(
    upload_id: str,
    first_seq: int,
    tensor_idx: int,
    t: EncodedTensor,
    payload: memoryview,
    step: int,
    start: int = 0,
    stripe: tuple[int, int] = (0, 1),
) -> Iterator[ChunkFrame]:
    for k in range(start, t.num_chunks):
        if not in_stripe(first_seq + k, *stripe):
            continue
        checksum = t.checksums[k]
        yield ChunkFrame.build(
            upload_id=upload_id,
            seq=first_seq + k,
            tensor_idx=tensor_idx,
            chunk_idx=k,
            header=t.header if k == 0 else None,
            data=payload[k * step : (k + 1) * step],
            checksum=checksum,
        )


class Downlink:
    """What pulls of one version receive; immutable once built (thread-safe to stream)."""

    def __init__(
        self,
        *,
        row_subset: str | None,
        group_of: Callable[[str], Group],
        version: int,
        shared: Mapping[str, torch.Tensor],
        digest: bytes,
        prev_digest: bytes,
        delta: Mapping[str, bytes] | None,
        codec_down: Codec,
        config: StreamConfig,
    ) -> None:
        """Args:
        row_subset: the tensor workers hold only rows of (sent per pull), or None.
        group_of: each tensor's accounting group (its headers carry it).
        shared: the version's tensors; they must never change afterwards.
        delta: the encoded outer update (``codec_down``) by name, or None (no previous version).
        """
        self.row_subset = row_subset
        self.group_of = group_of
        self.version = version
        self.shared = dict(shared)
        self.digest = digest
        self.prev_digest = prev_digest
        self._step = config.chunk_bytes
        self._fp32, self._raw = get_codec("fp32"), get_codec("raw")
        body_names = [k for k in self.shared if k != row_subset]
        self._full = tuple(self._encode_full(k) for k in body_names)
        self._delta: tuple[EncodedTensor, ...] | None = None
        if delta is not None:
            self._delta = self._encode_delta({k: delta[k] for k in body_names}, codec_down)
        self._digests: dict[bytes, bytes] = {}
        self._digests_lock = threading.Lock()

    @staticmethod
    def upload_id(version: int, delta: bool) -> str:
        return f"down-v{version}-{'delta' if delta else 'full'}"

    def _encode_full(self, name: str) -> EncodedTensor:
        x = self.shared[name]
        payload = tensor_payload(name, x, self._fp32, None)  # a view of the immutable tensor
        header, checksums = _encode(name, x, self._fp32, payload, self._step, self.group_of(name))
        return EncodedTensor(name, header, tuple(checksums), payload=memoryview(payload).cast("B"))

    def _encode_delta(self, encoded: Mapping[str, bytes], codec: Codec) -> tuple[EncodedTensor, ...]:
        upload_id = self.upload_id(self.version, True)
        out: list[EncodedTensor] = []
        seq = 0
        for idx, (name, data) in enumerate(encoded.items()):
            header, checksums = _encode(name, self.shared[name], codec, data, self._step, self.group_of(name))
            t = EncodedTensor(name, header, tuple(checksums))
            frames = tuple(_frames(upload_id, seq, idx, t, memoryview(data), self._step))
            out.append(replace(t, frames=frames))  # the frames hold the payload; ``data`` goes
            seq += len(checksums)
        return tuple(out)

    @property
    def has_delta(self) -> bool:
        return self._delta is not None

    @property
    def frame_bytes(self) -> int:
        """Bytes held in ready-made frames (the encoded update)."""
        return sum(len(f.wire) for t in self._delta or () for f in t.frames or ())

    # -- per worker --------------------------------------------------------------------------
    def replica_tensors(self, row_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """A worker's replica of this version (with a row subset: every other tensor, and its own
        rows with their ids)."""
        if self.row_subset is None:
            return self.shared
        out = {k: v for k, v in self.shared.items() if k != self.row_subset}
        if row_ids is not None:
            out[EMB_ROWS] = self.shared[self.row_subset].index_select(0, row_ids)
            out[EMB_IDS] = row_ids
        return out

    def replica_digest(self, row_ids: torch.Tensor | None) -> bytes:
        """The digest a worker's replica has at this version: the round digest, except with a row
        subset, where it covers the worker's rows (cached per set of rows)."""
        if self.row_subset is None:
            return self.digest
        key = tensors_digest({EMB_IDS: row_ids}) if row_ids is not None else b""
        with self._digests_lock:
            cached = self._digests.get(key)
        if cached is None:
            cached = tensors_digest(self.replica_tensors(row_ids))
            with self._digests_lock:
                self._digests[key] = cached
        return cached

    def body_digest(self) -> bytes:
        """xxh3-128 of the body group's tensors alone."""
        return tensors_digest({k: v for k, v in self.shared.items() if self.group_of(k) == Group.BODY})

    # -- streams -----------------------------------------------------------------------------
    def wants_delta(self, *, have_version: int, full: bool) -> bool:
        return not full and self._delta is not None and have_version == self.version - 1

    def open_info(self, *, delta: bool, round_idx: int, row_ids: torch.Tensor | None) -> StreamOpenInfo:
        return StreamOpenInfo(
            upload_id=self.upload_id(self.version, delta),
            sender_id="server",
            round_idx=round_idx,
            base_version=self.version - 1 if delta else 0,
            base_digest=self.prev_digest if delta else b"",
            target_version=self.version,
            target_digest=self.replica_digest(row_ids),
            is_delta=delta,
        )

    def stream(
        self,
        *,
        delta: bool,
        round_idx: int,
        row_ids: torch.Tensor | None = None,
        resume_from_seq: int = 0,
        resume_upload_id: str = "",
        resume_target_digest: bytes = b"",
        stripe: tuple[int, int] = (0, 1),
    ) -> Iterator[StreamItem]:
        """The open, the chunks (from ``resume_from_seq`` when the resume names this very
        stream; only those of ``stripe``, (index, count): see ``dept_comm.parallel``), the commit;
        lazily, one chunk at a time."""
        base = self._delta if delta else self._full
        assert base is not None, "no delta at this version"
        tensors: list[EncodedTensor] = list(base)
        extra: dict[str, memoryview] = {}
        if self.row_subset is not None and row_ids is not None:
            # Rows travel as current values (lossless), so a worker's rows equal the server's.
            for name, x, codec in (
                (EMB_ROWS, self.shared[self.row_subset].index_select(0, row_ids), self._fp32),
                (EMB_IDS, row_ids.contiguous(), self._raw),
            ):
                payload = memoryview(tensor_payload(name, x, codec, None)).cast("B")
                header, checksums = _encode(name, x, codec, payload, self._step, self.group_of(name))
                tensors.append(EncodedTensor(name, header, tuple(checksums), payload=payload))
                extra[name] = payload
        info = replace(
            self.open_info(delta=delta, round_idx=round_idx, row_ids=row_ids),
            num_tensors=len(tensors),
            payload_bytes=sum(int(t.header.encoded_bytes) for t in tensors),
        )
        resumed = resume_upload_id == info.upload_id and resume_target_digest == info.target_digest
        skip = resume_from_seq if resumed else 0
        yield pb.StreamMessage(open=info.to_pb())
        stream_hash = xxhash.xxh3_128()
        seq = 0
        for idx, t in enumerate(tensors):
            stream_hash.update(t.header.digest)
            n = t.num_chunks
            if seq + n <= skip:
                seq += n
                continue
            start = max(0, skip - seq)
            if t.frames is not None:
                yield from (f for f in t.frames[start:] if in_stripe(f.seq, *stripe))
            else:
                assert t.payload is not None
                yield from _frames(info.upload_id, seq, idx, t, t.payload, self._step, start, stripe)
            seq += n
        yield pb.StreamMessage(
            commit=pb.Commit(
                upload_id=info.upload_id,
                num_chunks=seq,
                num_tensors=len(tensors),
                digest=stream_hash.digest(),
            )
        )
