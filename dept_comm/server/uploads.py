"""ServerApp's upload path: a push stream into staging, its receipt, and the commit that folds it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

from dept_comm.accounting import metered
from dept_comm.codecs import codec_name
from dept_comm.errors import (
    ConflictError,
    MalformedMessageError,
    NotFoundError,
    OutlierUpdateError,
    PermissionDeniedError,
    StaleRoundError,
    StreamOrderError,
)
from dept_comm.frames import Undecodable, WireItem, kind_of
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.pipeline import squared_norm
from dept_comm.streaming import ReceiveLimits, StreamOpenInfo, StreamReceiver

from .aggregate import contribution_weight
from .state import AppState, _finite

logger = logging.getLogger(__name__)
CONCURRENT_CHECKS = 2
READ_AHEAD_STREAMS = 4  # pushes read ahead of their handlers at once; memory: streams x depth chunks
READ_AHEAD_DEPTH = 4


class UploadPath(AppState):
    """Push, QueryUpload and CommitUpdate (part of ServerApp)."""

    check_on_arrival = True  # check each tensor as its last chunk arrives (False: all at the commit)

    def push(self, messages: Iterable[WireItem]) -> service_pb2.PushReceipt:
        it = iter(messages)
        first = next(it, None)
        if isinstance(first, Undecodable):
            raise MalformedMessageError(f"the first message is not a StreamMessage: {first.reason}")
        if not isinstance(first, pb.StreamMessage) or kind_of(first) != "open":
            raise StreamOrderError("an upload must start with a StreamOpen message")
        info = StreamOpenInfo.from_pb(first.open)
        worker_id = info.sender_id
        self._known(worker_id)
        self.coordinator.check_push(worker_id, info.round_idx)
        if info.base_version != self.model.version:
            raise StaleRoundError(
                f"update trained from version {info.base_version}, current is {self.model.version}; re-pull"
            )
        expected = self.model.replica_digest(self._row_ids.get(worker_id))
        if info.base_digest != expected:
            raise StaleRoundError(
                f"update trained at version {info.base_version} from a replica whose digest "
                f"{info.base_digest.hex()[:16]} differs from the server's {expected.hex()[:16]} "
                "(a diverged replica); pull the whole body"
            )
        meter = self._worker_round(worker_id, info.round_idx).up
        meter.observe(first)
        # The coordinator owns the upload's life: it fences it, supersedes the worker's previous
        # upload, refuses one after the worker's commit, and later expires it; we free staging
        # for whatever it drops.
        self.coordinator.begin_upload(worker_id, info.round_idx, info.upload_id)
        self._free_dropped_uploads()
        with self._lock:
            entry = self._uploads.get(info.upload_id)
            if entry is not None and entry[0] != worker_id:
                raise PermissionDeniedError("upload id belongs to another worker")
            if entry is None:
                manifest = self.model.upload_manifest(self._row_ids.get(worker_id))
                limits = ReceiveLimits(
                    max_tensors=len(manifest),
                    allowed_codecs=frozenset({codec_name(self.config.codec_up), "raw", "fp32"}),
                )
                rx = StreamReceiver(
                    manifest=manifest,
                    limits=limits,
                    expected_upload_id=info.upload_id,
                    staging=self.staging.upload(),
                    # Each tensor is checked as its last chunk arrives (one decoded tensor per
                    # check slot); the commit then only verifies its digest and reads the norms.
                    check_on_arrival=self.check_on_arrival,
                    check_slots=self._checks,
                    check_executor=self._check_pool,
                )
                rx.add(first)
                entry = (worker_id, info.round_idx, rx)
                self._uploads[info.upload_id] = entry
            else:  # a resumed stream, or another stripe of a multi-stream push: the same open
                entry[2].add(first)
        rx = entry[2]
        touched = time.monotonic()
        for msg in metered(it, meter):
            kind = kind_of(msg)
            if kind == "open":
                raise StreamOrderError("a second StreamOpen inside one upload stream")
            if kind == "commit":
                raise StreamOrderError("send the commit with CommitUpdate, not inside the stream")
            rx.add(msg)
            if time.monotonic() - touched > 1.0:  # a slow link's long stream is activity too
                self.coordinator.touch_upload(worker_id, info.upload_id)
                touched = time.monotonic()
        return self._receipt(info.upload_id, rx)

    def _free_dropped_uploads(self) -> None:
        """Discard the staging of every upload the coordinator dropped (superseded, expired, left
        open at its round's end, or its worker left)."""
        dropped = self.coordinator.take_dropped_uploads()
        if not dropped:
            return
        with self._lock:
            for upload_id in dropped:
                entry = self._uploads.pop(upload_id, None)
                if entry is not None:
                    entry[2].discard()

    @staticmethod
    def _receipt(upload_id: str, rx: StreamReceiver) -> service_pb2.PushReceipt:
        held, missing = rx.receipt()
        return service_pb2.PushReceipt(upload_id=upload_id, num_chunks=held, missing_seqs=missing)

    def query_upload(self, req: service_pb2.QueryUploadRequest) -> service_pb2.PushReceipt:
        entry = self._uploads.get(req.upload_id)
        if entry is None:
            raise NotFoundError(f"no open upload {req.upload_id!r}")
        if entry[0] != req.worker_id:
            raise PermissionDeniedError("upload id belongs to another worker")
        return self._receipt(req.upload_id, entry[2])

    def commit(self, req: service_pb2.CommitUpdateRequest) -> service_pb2.CommitReply:
        self._known(req.worker_id)
        upload_id = req.commit.upload_id
        if self._counted_upload(req.worker_id, req.round_idx) == upload_id:  # retried: counted once
            return service_pb2.CommitReply(upload_id=upload_id, round_idx=req.round_idx, accepted=True)
        self.coordinator.check_push(req.worker_id, req.round_idx)
        entry = self._uploads.get(upload_id)
        if entry is None:
            raise NotFoundError(f"no open upload {upload_id!r}; push it first")
        worker_id, round_idx, rx = entry
        if worker_id != req.worker_id or round_idx != req.round_idx:
            raise PermissionDeniedError("upload belongs to another worker or round")
        self._worker_round(worker_id, round_idx).up.observe(req)
        rx.commit(req.commit)
        # Every tensor is checked (finite, manifest) before any is folded; both passes decode one
        # tensor at a time, so no full fp32 copy of an update exists, however many commit at once.
        # Tensors checked as they arrived (push) are not decoded again here: their norms are kept.
        rx.settle_checks()  # not inside a slot: the arrival checks need one
        with self._checks:
            norm = rx.validate()
        self._check_norm(worker_id, round_idx, norm)
        with self._close_lock:
            self.coordinator.check_push(req.worker_id, req.round_idx)
            counted = self._counted_upload(worker_id, round_idx)
            if counted is not None:  # refuse before folding: a fold cannot be taken back
                raise ConflictError(
                    f"worker {worker_id} already committed upload {counted} for round {round_idx}"
                )
            contribution_weight(self._aggregate.weighting, int(req.num_tokens))  # refused before it counts
            self.coordinator.commit(worker_id, upload_id, round_idx)
            self._norm_guard.accept(round_idx, norm)
            with self._lock:
                self._uploads.pop(upload_id, None)
            # The aggregate owns the upload now; it is folded in worker-id order (at once when
            # every member before this worker has been folded, else later), still encoded till then.
            self._aggregate.submit(worker_id, rx, num_tokens=int(req.num_tokens))
            # Not before the round has all its members: a later joiner may sort before those folded.
            members = self.coordinator.round_record().members
            if len(members) >= self.config.workers:
                self._aggregate.fold_ready(members)
            wr = self._worker_round(worker_id, round_idx)
            wr.train_loss = float(req.train_loss) if math.isfinite(req.train_loss) else None
            wr.metrics = _finite(req.metrics)
        logger.info("commit worker=%s round=%d loss=%.4f", worker_id, round_idx, req.train_loss)
        self.maybe_close()
        return service_pb2.CommitReply(upload_id=upload_id, round_idx=round_idx, accepted=True)

    def _check_norm(self, worker_id: str, round_idx: int, norm: float) -> None:
        """An update whose norm is an outlier (norm_guard.py) is refused, logged, and excused from the round."""
        try:
            self._norm_guard.check(worker_id, round_idx, norm, self._body_norm())
        except OutlierUpdateError as err:
            logger.warning("update_refused worker=%s round=%d reason=%s", worker_id, round_idx, err)
            # The round stops waiting for this worker; its staged upload is dropped and freed.
            if self.coordinator.excuse(worker_id, round_idx):
                self.maybe_close()
            raise

    def _body_norm(self) -> float:
        """The norm of every shared tensor at the current version (computed once per version)."""
        version = self.model.version
        if self._body_norm_at[0] != version:
            squares = sum(squared_norm(t) for t in self.model.shared.values())
            self._body_norm_at = (version, squares**0.5)
        return self._body_norm_at[1]
