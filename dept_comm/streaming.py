"""Chunked tensor streams: open, checksummed chunks with per-tensor headers, and a verified commit."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from typing import Any

import torch
import xxhash

from dept_comm.digest import Manifest, TensorSpec
from dept_comm.errors import (
    ChecksumError,
    CommitMismatchError,
    ConflictError,
    MalformedMessageError,
    ManifestMismatchError,
    SizeLimitError,
    StreamOrderError,
)
from dept_comm.frames import (
    ChunkFrame,
    Undecodable,
    WireItem,
    as_message,
    chunk_checksum,
    chunk_of,
    header_of,
    kind_of,
)
from dept_comm.manifest import (
    DEFAULT_LIMITS,
    PULL_LIMITS,
    ReceiveLimits,
    TensorStage,
    check_header,
)
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.pipeline import ArrivalChecks, checked_squared_norm
from dept_comm.sending import StreamConfig, StreamOpenInfo, encode_stream, unsent
from dept_comm.staging import UploadStaging

__all__ = [
    "PULL_LIMITS",
    "ReceiveLimits",
    "PullReceiver",
    "StreamConfig",
    "StreamOpenInfo",
    "StreamReceiver",
    "encode_stream",
    "receive_stream",
    "unsent",
]

logger = logging.getLogger(__name__)

# A seq this far past the highest one held is refused, so that a forged seq cannot make the
# receipt's missing list huge (64 Ki chunks is 64 GiB of 1 MiB chunks).
MAX_SEQ_AHEAD = 1 << 16


class StreamReceiver:
    """Validates a tensor stream message by message and stages its encoded bytes until commit.

    Every check runs before anything is stored, so a rejected message leaves the receiver as it
    was. A repeated identical open, chunk or commit is accepted once (resumed uploads); seq gaps
    are allowed and reported by ``receipt``. Thread-safe.
    """

    def __init__(
        self,
        *,
        manifest: Manifest | None = None,
        limits: ReceiveLimits = DEFAULT_LIMITS,
        expected_upload_id: str | None = None,
        require_all: bool = True,
        staging: UploadStaging | None = None,
        check_on_arrival: bool = False,
        check_slots: AbstractContextManager[Any] | None = None,
        check_executor: Executor | None = None,
        decode_on_arrival: bool = False,
        device: torch.device | None = None,
    ) -> None:
        """Args:
        manifest: expected tensors; headers must match it (names, shapes, dtypes, groups).
        limits: caps checked before staging.
        expected_upload_id: refuse an open for any other upload.
        require_all: with a manifest, the commit must cover every manifest tensor.
        staging: where encoded bytes wait (memory within a budget, else a file); default memory.
            The receiver closes it once every tensor was decoded, or on ``discard``.
        check_on_arrival: check each tensor (digest, decode, shape, finite, norm) as its last chunk
            arrives, under ``check_slots`` (on ``check_executor`` if given, off the receiving
            thread); ``validate`` then raises what those checks found and reads their norms
            (``dept_comm.pipeline.ArrivalChecks``). Call ``settle_checks`` before taking a slot.
        decode_on_arrival: decode each tensor (on ``device``) as its last chunk arrives, releasing
            its staging; ``tensors()`` still yields them only after a verified commit (pulls).
        """
        self._manifest = manifest
        self._limits = limits
        self._expected_upload_id = expected_upload_id
        self._require_all = require_all
        self._staging = staging
        self._lock = threading.Lock()
        self._open: pb.StreamOpen | None = None
        self._info: StreamOpenInfo | None = None
        self._tensors: dict[int, TensorStage] = {}
        self._names: set[str] = set()
        self._held: dict[int, tuple[int, int]] = {}  # seq -> (tensor_idx, chunk_idx)
        self._max_seq = -1
        self._raw_total = 0
        self._staged_bytes = 0
        self._commit: pb.Commit | None = None
        self._discarded = False
        self._decoding = False
        self._checks = ArrivalChecks(check_slots, check_executor) if check_on_arrival else None
        self._decode_on_arrival, self._device = decode_on_arrival, device
        self._decoded: dict[int, torch.Tensor] = {}

    @property
    def open_info(self) -> StreamOpenInfo | None:
        return self._info

    @property
    def staged_bytes(self) -> int:
        return self._staged_bytes

    @property
    def committed(self) -> bool:
        return self._commit is not None

    def add(self, msg: WireItem) -> None:
        """Validate one message and stage it (open, chunk or commit).

        Raises:
            StreamOrderError, ChecksumError, ConflictError, ManifestMismatchError, SizeLimitError,
            UnknownCodecError, CommitMismatchError: see the module's checks; nothing is stored.
        """
        if isinstance(msg, Undecodable):
            raise MalformedMessageError(f"a message of {msg.size} bytes is not a StreamMessage: {msg.reason}")
        chunk, kind = chunk_of(msg), kind_of(msg)
        # Hashed before the lock: stripes of one upload (several streams) hash their chunks at once.
        checksum = chunk_checksum(chunk.data) if chunk is not None else 0
        completed = None
        with self._lock:
            self._check_live()
            if chunk is not None:
                completed = self._add_chunk(chunk, header_of(chunk), checksum)
            elif kind == "open":
                self._add_open(as_message(msg).open)
            elif kind == "commit":
                self._commit_locked(as_message(msg).commit)
            else:
                raise StreamOrderError("stream message with no open, chunk or commit set")
        if completed is not None:
            self._on_arrival(completed)

    def _on_arrival(self, idx: int) -> None:
        """Tensor ``idx``'s last chunk arrived: check or decode it now (the options)."""
        finite = self._limits.require_finite
        if self._checks is not None:
            # The check reads the completed tensor's bytes, which no later message changes; only
            # discard() frees them, and it waits for the checks first (no lock while checking).
            with self._lock:
                if self._discarded or self._decoding:
                    return
                self._checks.submit(idx, self._tensors[idx], finite)
        elif self._decode_on_arrival:
            with self._lock:
                self._check_live()
                stage = self._tensors[idx]
                self._decoded[idx] = stage.decode(finite, self._device)
                self._staged_bytes -= stage.encoded_bytes

    def _add_open(self, o: pb.StreamOpen) -> None:
        if self._open is not None:
            if o == self._open:
                return
            raise ConflictError(f"second open for upload {self._open.upload_id!r} differs from the first")
        if not o.upload_id:
            raise StreamOrderError("open without an upload_id")
        if self._expected_upload_id is not None and o.upload_id != self._expected_upload_id:
            raise StreamOrderError(f"upload_id {o.upload_id!r}, expected {self._expected_upload_id!r}")
        if o.num_tensors > self._limits.max_tensors:
            raise SizeLimitError(f"open declares {o.num_tensors} tensors, limit {self._limits.max_tensors}")
        if self._manifest is not None and self._require_all and o.num_tensors != len(self._manifest):
            raise ManifestMismatchError(
                f"open declares {o.num_tensors} tensors, manifest has {len(self._manifest)}"
            )
        self._open = pb.StreamOpen()
        self._open.CopyFrom(o)
        self._info = StreamOpenInfo.from_pb(o)

    def _add_chunk(
        self, c: pb.TensorChunk | ChunkFrame, header: pb.TensorHeader | None, checksum: int
    ) -> int | None:
        """Check and stage one chunk (``checksum``: of its data); returns its tensor's index if
        this chunk completed it."""
        o = self._open
        if o is None:
            raise StreamOrderError("chunk before the stream's open")
        data = c.data
        if checksum != c.checksum:
            raise ChecksumError(f"chunk seq={c.seq} checksum mismatch ({len(data)} bytes)")
        if c.upload_id != o.upload_id:
            raise StreamOrderError(f"chunk seq={c.seq} for upload {c.upload_id!r}, stream is {o.upload_id!r}")
        if len(data) > self._limits.max_chunk_bytes:
            raise SizeLimitError(
                f"chunk seq={c.seq} has {len(data)} bytes, limit {self._limits.max_chunk_bytes}"
            )
        held = self._held.get(c.seq)
        if held is not None:
            self._check_duplicate(c, held, data)
            return None
        if self._commit is not None:
            raise StreamOrderError(f"new chunk seq={c.seq} after the commit")
        if c.seq > self._max_seq + MAX_SEQ_AHEAD:
            raise StreamOrderError(f"chunk seq={c.seq} is more than {MAX_SEQ_AHEAD} past seq {self._max_seq}")
        if c.tensor_idx >= o.num_tensors:
            raise StreamOrderError(
                f"chunk seq={c.seq} tensor_idx={c.tensor_idx}, open declares {o.num_tensors}"
            )
        has_header = header is not None
        if has_header != (c.chunk_idx == 0):
            raise StreamOrderError(
                f"chunk seq={c.seq} chunk_idx={c.chunk_idx}: header must be set iff chunk_idx == 0"
            )
        stage = self._tensors.get(c.tensor_idx)
        new = None
        if header is not None:
            if stage is not None:
                raise ConflictError(f"tensor_idx={c.tensor_idx} already has a header (chunk seq={c.seq})")
            spec, codec = check_header(
                header,
                manifest=self._manifest,
                limits=self._limits,
                seen_names=self._names,
                raw_bytes_so_far=self._raw_total,
            )
            allocate = self._staging.allocate if self._staging is not None else None
            new = stage = TensorStage(spec, codec, header, len(data), allocate)
        elif stage is None:
            raise StreamOrderError(
                f"chunk seq={c.seq} of tensor_idx={c.tensor_idx} before that tensor's header"
            )
        stage.check(c.chunk_idx, len(data), c.seq)
        # Every check passed: store.
        if new is not None:
            self._tensors[c.tensor_idx] = new
            self._names.add(new.spec.name)
            self._raw_total += new.spec.numel * 4
        stage.store(c.chunk_idx, data, checksum)
        if self._checks is not None:
            self._checks.chunk(c.tensor_idx, stage, c.chunk_idx)
        self._staged_bytes += len(data)
        self._held[c.seq] = (c.tensor_idx, c.chunk_idx)
        self._max_seq = max(self._max_seq, c.seq)
        return c.tensor_idx if len(stage.held) == stage.num_chunks else None

    def _check_duplicate(
        self, c: pb.TensorChunk | ChunkFrame, held: tuple[int, int], data: bytes | memoryview
    ) -> None:
        if self._decoding:
            raise StreamOrderError(f"chunk seq={c.seq} after the tensors were decoded")
        same = (c.tensor_idx, c.chunk_idx) == held and self._tensors[held[0]].view(held[1]) == data
        if not same:
            raise ConflictError(f"chunk seq={c.seq} resent with different content")

    def missing_seqs(self) -> list[int]:
        """Seqs below the highest one held that have not arrived."""
        with self._lock:
            if len(self._held) == self._max_seq + 1:
                return []
            return [s for s in range(self._max_seq) if s not in self._held]

    def receipt(self) -> tuple[int, list[int]]:
        """(chunks held, missing seqs below the highest seen)."""
        with self._lock:
            held = len(self._held)
        return held, self.missing_seqs()

    def push_receipt(self) -> service_pb2.PushReceipt:
        """The receipt as a ``PushReceipt``; its digest is set once the stream is committed."""
        held, missing = self.receipt()
        upload_id = self._open.upload_id if self._open is not None else ""
        digest = self._commit.digest if self._commit is not None else b""
        return service_pb2.PushReceipt(
            upload_id=upload_id, num_chunks=held, missing_seqs=missing, digest=digest
        )

    def commit(self, c: pb.Commit) -> None:
        """Verify ``c`` against everything held; idempotent for an identical commit.

        Raises:
            StreamOrderError: no open yet.
            CommitMismatchError: missing chunks, wrong counts, or a digest mismatch.
            ConflictError: a different commit after a successful one.
        """
        with self._lock:
            self._check_live()
            self._commit_locked(c)

    def _commit_locked(self, c: pb.Commit) -> None:
        o = self._open
        if o is None:
            raise StreamOrderError("commit before the stream's open")
        if self._commit is not None:
            if c == self._commit:
                return
            raise ConflictError(f"upload {o.upload_id!r} is already committed with a different commit")
        if c.upload_id != o.upload_id:
            raise CommitMismatchError(f"commit for upload {c.upload_id!r}, stream is {o.upload_id!r}")
        if c.num_tensors != o.num_tensors or c.num_tensors != len(self._tensors):
            raise CommitMismatchError(
                f"commit num_tensors={c.num_tensors}, open declared {o.num_tensors}, headers held {len(self._tensors)}"
            )
        if self._manifest is not None and self._require_all and c.num_tensors != len(self._manifest):
            raise CommitMismatchError(
                f"commit num_tensors={c.num_tensors}, manifest has {len(self._manifest)}"
            )
        total = sum(t.num_chunks for t in self._tensors.values())
        if c.num_chunks != total:
            raise CommitMismatchError(f"commit num_chunks={c.num_chunks}, headers declare {total}")
        if len(self._held) != total or self._max_seq != total - 1:
            missing = [s for s in range(total) if s not in self._held]
            raise CommitMismatchError(
                f"commit with {len(self._held)} of {total} chunks held; missing seqs {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}"
            )
        for t in self._tensors.values():
            if len(t.held) != t.num_chunks:
                raise CommitMismatchError(
                    f"tensor {t.spec.name!r} holds {len(t.held)} of {t.num_chunks} chunks"
                )
        for t in self._tensors.values():
            t.verify_digest()  # from the chunk checksums verified on arrival
        stream = xxhash.xxh3_128()
        for idx in sorted(self._tensors):
            stream.update(self._tensors[idx].digest)
        digest = stream.digest()
        if c.digest != digest:
            raise CommitMismatchError(f"commit digest {c.digest.hex()} != received {digest.hex()}")
        self._commit = pb.Commit()
        self._commit.CopyFrom(c)

    def tensors(self, device: torch.device | None = None) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """Decode the committed tensors one at a time, in stream order; each is decoded once.

        ``device``: where int8/int4 payloads are dequantised (CUDA: on the GPU; default the CPU).

        A tensor's staging buffer is released (or, for same-bytes codecs, becomes the tensor)
        as it is yielded, so a second call raises.

        Raises:
            StreamOrderError: not committed, or already decoded.
            CommitMismatchError: a tensor's payload digest differs from its header.
            NonFiniteError: a decoded tensor holds NaN/Inf (when the limits require finite values).
        """
        with self._lock:
            self._check_live()
            if self._commit is None:
                raise StreamOrderError("tensors() before a verified commit")
            if self._decoding:
                raise StreamOrderError("tensors() called twice; each tensor is decoded once")
            self._decoding = True
        try:
            for idx in range(len(self._tensors)):
                stage = self._tensors[idx]
                out = self._decoded.pop(idx, None)
                if out is None:
                    out = stage.decode(self._limits.require_finite, device)
                    self._staged_bytes -= stage.encoded_bytes
                yield stage.spec, out
                del out  # the consumer's reference is the only one while it asks for the next
        finally:
            if self._staging is not None:
                self._staging.close()

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``tensors()`` as (name, tensor) pairs, holding no tensor once the next is asked for
        (for a fold that must never have two decoded tensors of one update at once)."""
        for spec, t in self.tensors():
            yield spec.name, t
            del t

    def validate(self) -> float:
        """Decode every committed tensor once to check it (digest, shape, finite values) and keep
        nothing decoded: memory is one tensor at a time. ``tensors()`` then decodes them for use.

        With ``check_on_arrival``, tensors checked as they arrived are not decoded again: their
        recorded error is raised (in tensor order) or their recorded norm is used.

        Returns:
            the L2 norm over the floating-point tensors (integer ones, e.g. row ids, left out),
            taken in the same pass, for outlier checks.

        Raises:
            StreamOrderError: not committed, or already decoded.
            CommitMismatchError, ManifestMismatchError, NonFiniteError: as ``tensors()``.
        """
        with self._lock:
            self._check_live()
            if self._commit is None:
                raise StreamOrderError("validate() before a verified commit")
            if self._decoding:
                raise StreamOrderError("validate() after tensors(): nothing is left to check")
        squares = 0.0
        for idx in range(len(self._tensors)):
            square = self._checks.result(idx) if self._checks is not None else None
            if square is None:  # not checked on arrival (or not asked to): check it now
                square = checked_squared_norm(self._tensors[idx], self._limits.require_finite)
            squares += square
        return math.sqrt(squares)

    def settle_checks(self) -> None:
        """Wait until the checks begun on arrival ended (before taking a check slot to validate)."""
        if self._checks is not None:
            self._checks.settle()

    @property
    def checked_on_arrival(self) -> int:
        """How many tensors were checked as their last chunk arrived."""
        return len(self._checks) if self._checks is not None else 0

    def decode_all(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Decode and validate every tensor, then return them by name (nothing on any failure)."""
        return {spec.name: t for spec, t in self.tensors(device)}

    def discard(self) -> None:
        """Drop the staged bytes (superseded or expired upload); the receiver is unusable after."""
        with self._lock:
            if self._checks is not None:
                self._checks.clear()  # waits for the checks reading the stages freed below
            for stage in self._tensors.values():
                stage.release()
            if self._staging is not None:
                self._staging.close()
            self._tensors.clear()
            self._decoded.clear()
            self._held.clear()
            self._names.clear()
            self._staged_bytes = 0
            self._discarded = True

    def _check_live(self) -> None:
        if self._discarded:
            raise StreamOrderError("receiver was discarded (upload superseded or expired)")


class PullReceiver:
    """Receives a stream message by message (a pull as it arrives), decoding each tensor as soon as
    its last chunk came, so decoding overlaps receiving; the tensors come out only after the commit
    verified (``result``). ``restart`` drops what was held (the sender began another stream).
    """

    def __init__(
        self,
        *,
        manifest: Manifest | None = None,
        limits: ReceiveLimits = DEFAULT_LIMITS,
        require_all: bool = True,
        device: torch.device | None = None,
    ) -> None:
        self._manifest, self._limits, self._require_all, self._device = manifest, limits, require_all, device
        self._rx = self._receiver()

    def _receiver(self) -> StreamReceiver:
        return StreamReceiver(
            manifest=self._manifest,
            limits=self._limits,
            require_all=self._require_all,
            decode_on_arrival=True,
            device=self._device,
        )

    def add(self, msg: WireItem) -> None:
        """Take the next message (see ``StreamReceiver.add``).

        Raises:
            StreamOrderError: a message after the commit; plus everything ``StreamReceiver.add`` raises.
        """
        if self._rx.committed and not isinstance(msg, Undecodable):
            raise StreamOrderError(f"message {kind_of(msg)!r} after the commit")
        self._rx.add(msg)

    def restart(self) -> None:
        """Forget everything held and decoded: another stream begins."""
        self._rx.discard()
        self._rx = self._receiver()

    def result(self) -> tuple[StreamOpenInfo, dict[str, torch.Tensor]]:
        """The stream's open info and its tensors by name, once it was committed.

        Raises:
            CommitMismatchError: the stream ended without a commit.
        """
        rx = self._rx
        if not rx.committed or rx.open_info is None:
            raise CommitMismatchError("stream ended without a commit")
        return rx.open_info, rx.decode_all(self._device)


def receive_stream(
    messages: Iterable[WireItem],
    *,
    manifest: Manifest | None = None,
    limits: ReceiveLimits = DEFAULT_LIMITS,
    require_all: bool = True,
    device: torch.device | None = None,
) -> tuple[StreamOpenInfo, dict[str, torch.Tensor]]:
    """Read a whole stream (e.g. a pull) and return its open info and decoded tensors; each tensor
    is decoded as its last chunk arrives (``PullReceiver``), so a lazy ``messages`` overlaps both.

    ``device``: a CUDA device dequantises int8/int4 tensors there (see ``StreamReceiver.tensors``).

    Raises:
        CommitMismatchError: the stream ended without a commit.
        StreamOrderError: a message after the commit; plus everything ``StreamReceiver.add`` raises.
    """
    rx = PullReceiver(manifest=manifest, limits=limits, require_all=require_all, device=device)
    for msg in messages:
        rx.add(msg)
    return rx.result()
