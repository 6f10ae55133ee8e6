"""ServerApp: the coordinator's state and round logic, with no gRPC types beyond protobuf messages."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dept_comm.accounting import ByteMeter, RoundMetrics, WorkerRoundMetrics, metered
from dept_comm.checkpoint import CheckpointStore
from dept_comm.codecs import codec_name
from dept_comm.coordinator import CoordinatorConfig, RoundCoordinator, worker_id_for
from dept_comm.errors import (
    ConflictError,
    MalformedMessageError,
    ManifestMismatchError,
    NotFoundError,
    OutlierUpdateError,
    PermissionDeniedError,
    ResumeMismatchError,
    RunFinishedError,
    StaleRoundError,
    StreamOrderError,
)
from dept_comm.frames import StreamItem, Undecodable, WireItem, kind_of
from dept_comm.memory import release_freed_memory
from dept_comm.names import EMB_WEIGHT
from dept_comm.outer import build_outer
from dept_comm.parallel import stripe_of
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.progress import InflightTransfers
from dept_comm.staging import StagingArea
from dept_comm.streaming import ReceiveLimits, StreamOpenInfo, StreamReceiver

from .admission import WAIT_SLOTS, StreamSlots
from .aggregate import RoundAggregate, contribution_weight
from .config import ServerConfig
from .initial import InitialState, initial_shared_tensors
from .model_state import GlobalModel
from .norm_guard import NormGuard
from .sessions import JoinPolicy, Sessions, read_tokens
from .watch import RoundWatchers

logger = logging.getLogger(__name__)

CONCURRENT_CHECKS = 2
ATTRIBUTES_SCHEMA = "dept/1"  # JoinRequest.attributes: dept.variant, dept.vocab_digest (hex)
STAGING_AUTO_MIN_MIB = 16
STAGING_AUTO_MAX_MIB = 1024


def auto_staging_memory_mib(body_fp32_bytes: int) -> int:
    """The default --staging-memory-mib: a quarter of the fp32 body (about one int8-encoded
    upload), at least 16 and at most 1024 MiB; the rest of the open uploads wait in files."""
    return max(STAGING_AUTO_MIN_MIB, min(STAGING_AUTO_MAX_MIB, body_fp32_bytes // 4 >> 20))


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """Worker-reported metrics without NaN/Inf (they cannot go into JSON checkpoints)."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def check_resume_compatible(meta: Mapping[str, Any], config: ServerConfig, vocab_digest: str) -> None:
    """Refuse to resume a checkpoint made by a run of another variant, model or vocabulary.

    Raises:
        ResumeMismatchError: naming the checkpoint's value and this server's, for each that differs.
    """
    wanted = {"variant": config.variant, "model": config.model, "vocab_digest": vocab_digest}
    flags = {"variant": "--variant", "model": "--model", "vocab_digest": "--vocab (digest)"}
    differ = [
        f"{flags[k]}: checkpoint {meta.get(k)!r}, this server {v!r}"
        for k, v in wanted.items()
        if k in meta and meta[k] != v
    ]
    if differ:
        raise ResumeMismatchError(
            "cannot --resume: the checkpoint was made by another run ("
            + "; ".join(differ)
            + "). Start with the same settings, or use another --checkpoint-dir."
        )


@dataclass
class WorkerRound:
    """Per worker, per round: bytes each way and what it reported."""

    source: str
    up: ByteMeter = field(default_factory=ByteMeter)
    down: ByteMeter = field(default_factory=ByteMeter)
    train_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class ServerApp:
    """Everything dept-server does between decoding a request and encoding the reply."""

    def __init__(self, config: ServerConfig, initial: InitialState | None = None) -> None:
        """``initial``: the starting tensors, vocabulary digest and run description (default:
        built from ``config.model``; the load benchmark passes a synthetic body)."""
        self.config = config
        self._store = CheckpointStore(config.checkpoint_dir) if config.checkpoint_dir else None
        shared, vocab_digest, self.run_info = (
            initial if initial is not None else initial_shared_tensors(config)
        )
        self.vocab_digest = vocab_digest
        outer = build_outer(config.outer, config.outer_lr, config.outer_momentum)
        self.model = GlobalModel(
            variant=config.variant, shared=shared, outer=outer, codec_down=config.codec_down, copy=False
        )  # the initial tensors are this app's alone (built here, or handed over by the caller)
        self.coordinator = RoundCoordinator(
            CoordinatorConfig(
                num_rounds=config.rounds,
                expected_workers=config.workers,
                min_workers=config.quorum,
                round_timeout_s=config.round_timeout_s,
                heartbeat_timeout_s=config.heartbeat_timeout_s,
                max_workers=config.max_workers,
            )
        )
        # Identity and concurrency (sessions.py, admission.py, watch.py, norm_guard.py).
        self.sessions = Sessions()
        tokens = read_tokens(config.tokens_file) if config.tokens_file is not None else None
        self.join_policy = JoinPolicy(tokens, require_cert_name=config.tls_client_ca is not None)
        self.streams = StreamSlots(config.max_streams)
        self.inflight = InflightTransfers()  # bytes moving now, for --metrics-port (servicer.py counts)
        self._wait_slots = threading.BoundedSemaphore(WAIT_SLOTS)
        self._norm_guard = NormGuard(config.max_update_norm_ratio)
        self._body_norm_at: tuple[int, float] = (-1, 0.0)
        self.watchers = RoundWatchers(self.round_info, limit=2 * config.max_workers)
        vocab, dim = shared[EMB_WEIGHT].shape if config.variant == "trim" else (0, 0)
        self._aggregate = RoundAggregate(
            {k: tuple(v.shape) for k, v in shared.items()},
            trim_rows=(vocab, dim) if config.variant == "trim" else None,
            weighting=config.outer_weighting,
        )
        self._staging_tmp: tempfile.TemporaryDirectory[str] | None = None
        self.staging = self._staging_area(config)
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        # Commits check their uploads at most this many at a time: each check holds a decoded
        # tensor and its temporaries, and the work is CPU-bound anyway (see docs/SCALE.md).
        self._checks = threading.BoundedSemaphore(CONCURRENT_CHECKS)
        self._uploads: dict[str, tuple[str, int, StreamReceiver]] = {}  # upload_id -> (worker, round, rx)
        self._row_ids: dict[str, torch.Tensor] = {}
        self._sources: dict[str, str] = {}
        self._rounds: dict[int, dict[str, WorkerRound]] = {}
        self._round_started = time.monotonic()
        self.records: list[RoundMetrics] = []
        self.final_eval: dict[str, dict[str, float]] = {}
        self._left: set[str] = set()
        self._left_cond = threading.Condition(self._lock)
        self.finished = threading.Event()
        if config.resume:
            try:
                self._resume()
            except BaseException:
                self.close()  # release the checkpoint directory's lock
                raise

    # -- startup -----------------------------------------------------------------------------
    def _staging_area(self, config: ServerConfig) -> StagingArea:
        """Uploads wait in memory up to --staging-memory-mib, then in files (stale ones removed)."""
        directory = config.staging_dir
        if directory is None and config.checkpoint_dir is not None:
            directory = config.checkpoint_dir / "staging"
        if directory is None:
            self._staging_tmp = tempfile.TemporaryDirectory(prefix="dept-staging-")
            directory = Path(self._staging_tmp.name)
        budget_mib = config.staging_memory_mib
        if budget_mib is None:
            budget_mib = auto_staging_memory_mib(4 * self.model.body_numel)
        logger.info("staging memory_mib=%d dir=%s", budget_mib, directory)
        area = StagingArea(directory, budget_mib << 20)
        area.clean_stale()
        return area

    def _resume(self) -> None:
        assert self._store is not None
        ckpt = self._store.latest()
        if ckpt is None:
            logger.warning(
                "resume requested but no checkpoint in %s; starting fresh", self.config.checkpoint_dir
            )
            return
        meta = ckpt.meta
        check_resume_compatible(meta, self.config, self.vocab_digest)
        self.model.restore(ckpt.tensors, version=int(meta["version"]))
        # Checkpoints before the round digest covered the shared embeddings hold the body's digest.
        restored = self.model.digest if meta.get("digest_covers") == "shared" else self.model.body_digest()
        if restored.hex() != meta["digest"]:
            raise ManifestMismatchError("checkpoint digest does not match its tensors")
        state = self.coordinator.restore(int(meta["round_idx"]), int(meta["version"]), self.model.digest)
        if state.finished:  # killed after its last round: serve final pulls and evaluations, then exit
            self.finished.set()
        self.records = [RoundMetrics.from_dict(r) for r in meta.get("records", [])]
        if self.config.metrics_path is not None:
            tmp = self.config.metrics_path.with_name(self.config.metrics_path.name + ".tmp")
            tmp.write_text("".join(r.to_json_line() + "\n" for r in self.records))
            os.replace(tmp, self.config.metrics_path)
        logger.info("resumed round=%d version=%d", meta["round_idx"], meta["version"])

    # -- round info --------------------------------------------------------------------------
    def round_info(self, worker_id: str | None = None) -> service_pb2.RoundInfo:
        state = self.coordinator.current_round()
        committed = worker_id is not None and self._counted_upload(worker_id, state.round_idx) is not None
        admitted = state.round_idx
        if worker_id is not None and not state.finished:
            try:
                admitted = self.coordinator.worker(worker_id).admitted_round
            except NotFoundError:
                admitted = state.round_idx + 1  # unknown or left: it takes part in no open round
        return service_pb2.RoundInfo(
            round_idx=state.round_idx,
            version=self.model.version,
            body_digest=self.model.digest,
            deadline_unix_ms=int(state.deadline_unix_s * 1000) if state.deadline_unix_s else 0,
            state=service_pb2.RUN_STATE_FINISHED if state.finished else service_pb2.RUN_STATE_RUNNING,
            committed=committed,
            num_rounds=self.config.rounds,
            admitted_round=admitted,
        )

    def _counted_upload(self, worker_id: str, round_idx: int) -> str | None:
        """The upload the coordinator counted for this worker and round, if any."""
        try:
            record = self.coordinator.round_record()
            if record.round_idx != round_idx:
                record = self.coordinator.round_record(round_idx)
        except NotFoundError:
            return None
        if record.outcome == "abandoned":
            return None
        return next((c.upload_id for c in record.commits if c.worker_id == worker_id), None)

    def _worker_round(self, worker_id: str, round_idx: int) -> WorkerRound:
        with self._lock:
            per_round = self._rounds.setdefault(round_idx, {})
            if worker_id not in per_round:
                per_round[worker_id] = WorkerRound(source=self._sources.get(worker_id, "?"))
            return per_round[worker_id]

    # -- RPC bodies --------------------------------------------------------------------------
    def join(
        self,
        req: service_pb2.JoinRequest,
        *,
        bearer: str | None = None,
        cert_names: Iterable[str] | None = None,
    ) -> service_pb2.JoinReply:
        """Register the worker and issue its session credential (its previous one stops working).

        ``bearer`` is the caller's token and ``cert_names`` its client certificate's names (mutual
        TLS): with ``--tokens`` or mTLS they must allow the worker's name.
        """
        self.join_policy.check(req.worker_name or req.source_id, bearer, cert_names)
        attrs = req.attributes
        if attrs and req.attributes_schema != ATTRIBUTES_SCHEMA:
            raise ManifestMismatchError(
                f"join attributes of schema {req.attributes_schema!r}; this server reads {ATTRIBUTES_SCHEMA!r}"
            )
        variant = attrs.get("dept.variant", "") or self.config.variant  # unset: the server's variant
        if variant != self.config.variant:
            raise ManifestMismatchError(
                f"server runs variant {self.config.variant}, worker asked for {variant}"
            )
        worker_vocab = attrs.get("dept.vocab_digest", "")
        if self.config.shares_embeddings and worker_vocab != self.vocab_digest:
            raise ManifestMismatchError(
                f"vocabulary digest mismatch: the server's global tokenizer is {self.vocab_digest[:16]}...,"
                f" the worker's is {worker_vocab[:16]}...; pass the server's --vocab file to the worker"
            )
        for codec in (codec_name(self.config.codec_up), codec_name(self.config.codec_down)):
            if req.codecs and codec not in req.codecs:
                raise ManifestMismatchError(
                    f"worker cannot use codec {codec!r}; it offers {list(req.codecs)}"
                )
        name = req.worker_name or req.source_id
        try:
            worker_id = self.coordinator.join(name, req.source_id, variant, worker_vocab).worker_id
        except RunFinishedError:
            # A worker back after the last round (its server restarted, or it did) may still pull
            # the final body to evaluate it and report on Leave; it takes part in no round.
            worker_id = worker_id_for(name)
        with self._lock:
            self._sources[worker_id] = req.source_id
        session = self.sessions.issue(worker_id)
        info = self.round_info(worker_id)
        logger.info(
            "join worker=%s source=%s round=%d admitted_round=%d",
            worker_id,
            req.source_id,
            info.round_idx,
            info.admitted_round,
        )
        return service_pb2.JoinReply(
            worker_id=worker_id,
            run_config_json=json.dumps(self.run_info),
            round=info,
            codec_up=self.config.codec_up,
            codec_down=self.config.codec_down,
            session=session,
            heartbeat_interval_ms=max(100, int(self.config.heartbeat_timeout_s * 1000 / 3)),
        )

    def _known(self, worker_id: str) -> None:
        if worker_id not in self._sources:
            raise NotFoundError(f"unknown worker {worker_id!r}; join first")

    def pull(self, req: service_pb2.PullRequest) -> Iterator[StreamItem]:
        """The current version's down-link (built once at the round's close) from the chunk the
        request resumes at; no lock is held while it streams, and the body is never copied."""
        self._known(req.worker_id)
        row_ids = None
        if self.config.variant == "trim":
            if req.row_ids:
                row_ids = self.model.check_row_ids(torch.tensor(list(req.row_ids), dtype=torch.int64))
                with self._lock:
                    self._row_ids[req.worker_id] = row_ids
            else:
                row_ids = self._row_ids.get(req.worker_id)
        downlink = self.model.downlink  # one immutable version, whatever closes meanwhile
        round_idx = self.coordinator.current_round().round_idx
        messages = downlink.stream(
            delta=downlink.wants_delta(have_version=req.have_version, full=req.full),
            round_idx=round_idx,
            row_ids=row_ids,
            resume_from_seq=req.resume_from_seq,
            resume_upload_id=req.resume_upload_id,
            resume_target_digest=req.resume_target_digest,
            stripe=stripe_of(req),  # InvalidInputError for bad stripe values
        )
        meter = self._worker_round(req.worker_id, round_idx).down
        return metered(messages, meter)

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
            squares = sum(float(torch.linalg.vector_norm(t)) ** 2 for t in self.model.shared.values())
            self._body_norm_at = (version, squares**0.5)
        return self._body_norm_at[1]

    def wait_round(self, req: service_pb2.WaitRoundRequest) -> service_pb2.RoundInfo:
        """A bounded long poll (at most 30 s, and ``WAIT_SLOTS`` at once: beyond them it answers at
        once with the current round). Workers use WatchRounds, which holds no thread."""
        timeout_s = min(max(req.timeout_ms, 0) / 1000.0, 30.0)
        if self._wait_slots.acquire(blocking=False):
            try:
                self.coordinator.wait_for_round_after(req.round_idx, timeout_s)
            finally:
                self._wait_slots.release()
        return self.round_info(req.worker_id)

    def heartbeat(self, req: service_pb2.HeartbeatRequest) -> service_pb2.HeartbeatReply:
        self._known(req.worker_id)
        self.coordinator.heartbeat(req.worker_id)
        return service_pb2.HeartbeatReply(round=self.round_info(req.worker_id))

    def leave(self, req: service_pb2.LeaveRequest) -> service_pb2.LeaveReply:
        self._known(req.worker_id)
        try:
            self.coordinator.leave(req.worker_id)
        except NotFoundError:
            if not self.coordinator.current_round().finished:
                raise  # only a worker admitted after the run's end is unknown to the coordinator
        with self._lock:
            if req.metrics:
                self.final_eval[self._sources[req.worker_id]] = _finite(req.metrics)
            self._left.add(req.worker_id)
            self._left_cond.notify_all()
        self.sessions.revoke(req.worker_id)
        logger.info("leave worker=%s reason=%s", req.worker_id, req.reason)
        return service_pb2.LeaveReply()

    # -- closing rounds ----------------------------------------------------------------------
    def maybe_close(self) -> bool:
        """Close the open round if every expected worker committed, or at the deadline with quorum.

        Also frees the staging of uploads the coordinator dropped since the last call (the
        server's ticker calls this twice a second).
        """
        self._free_dropped_uploads()
        with self._close_lock:
            state = self.coordinator.current_round()
            if state.finished or not self.coordinator.ready_to_close(time.time()):
                if not state.finished and self.coordinator.should_abandon(time.time()):
                    logger.warning("round=%d below quorum at the deadline: abandoned", state.round_idx)
                    self._aggregate.reset()
                    state = self.coordinator.abandon_round()
                    # Persist the new round index so a restart never sends the round id backwards.
                    self._checkpoint(state.round_idx)
                    self.watchers.publish()
                return False
            self._close_round(state.round_idx)
            return True

    def _close_round(self, round_idx: int) -> None:
        started = time.monotonic()
        self._aggregate.fold_all()  # uploads still waiting for their turn count in this round
        num = self._aggregate.num_contributions
        self.model.apply_round(self._aggregate.take_means())  # tensor by tensor; resets the sums
        record = self._round_record(round_idx, num)
        self.records.append(record)
        # Checkpoint first (it carries the records), then the JSONL line: a kill in between
        # loses no round, and a resumed server rewrites the metrics file from the checkpoint.
        self._checkpoint(round_idx + 1)
        if self.config.metrics_path is not None:
            record.append_jsonl(self.config.metrics_path)
        state = self.coordinator.close_round(self.model.digest)
        logger.info(
            "round_done round=%d workers=%d up_payload_bytes=%d down_payload_bytes=%d close_s=%.2f",
            round_idx,
            num,
            record.up_payload_bytes,
            record.down_payload_bytes,
            time.monotonic() - started,
        )
        self._round_started = time.monotonic()
        self._free_dropped_uploads()  # the coordinator dropped what was left open in the round
        release_freed_memory()  # the round's sums and the previous version go back to the system
        self.watchers.publish()
        if state.finished:
            self.finished.set()

    def _round_record(self, round_idx: int, num_workers: int) -> RoundMetrics:
        per_worker = self._rounds.pop(round_idx, {})
        workers = [
            WorkerRoundMetrics.from_meters(
                worker_id, wr.source, up=wr.up, down=wr.down, train_loss=wr.train_loss
            )
            for worker_id, wr in sorted(per_worker.items())
        ]
        evals = {wr.source: wr.metrics for wr in per_worker.values() if wr.metrics}
        return RoundMetrics(
            round=round_idx,
            variant=self.config.variant,
            num_workers=num_workers,
            duration_s=time.monotonic() - self._round_started,
            up_raw_bytes=sum(w.up_raw_bytes for w in workers),
            up_payload_bytes=sum(w.up_payload_bytes for w in workers),
            down_raw_bytes=sum(w.down_raw_bytes for w in workers),
            down_payload_bytes=sum(w.down_payload_bytes for w in workers),
            body_digest=self.model.body_digest().hex(),
            digest=self.model.digest.hex(),
            replica_digests=self._replica_digests(per_worker),
            workers=workers,
            full_model_fp32_bytes=int(self.run_info["full_model_fp32_bytes"]),
            uncompressed_body_bytes=4 * self.model.body_numel,
            eval=evals,
            version=self.model.version,
            codec_up=self.config.codec_up,
            codec_down=self.config.codec_down,
        )

    def _replica_digests(self, per_worker: Mapping[str, WorkerRound]) -> dict[str, str]:
        """TRIM: by source, the digest each worker's replica must have after this round (its
        rows differ per worker); other variants' replicas all carry the round digest."""
        if self.config.variant != "trim":
            return {}
        with self._lock:
            ids = {w: self._row_ids[w] for w in per_worker if w in self._row_ids}
        return {per_worker[w].source: self.model.replica_digest(i).hex() for w, i in sorted(ids.items())}

    def _checkpoint(self, next_round: int) -> None:
        if self._store is None:
            return
        meta: dict[str, Any] = {
            "round_idx": next_round,
            "version": self.model.version,
            "digest": self.model.digest.hex(),
            "digest_covers": "shared",
            "variant": self.config.variant,
            "model": self.config.model,
            "vocab_digest": self.vocab_digest,
            "records": [r.to_dict() for r in self.records],
        }
        # Steps are the next round index: strictly increasing across closes and abandons, so a
        # save never overwrites the checkpoint a crash would fall back to.
        self._store.save(next_round, self.model.checkpoint_groups(), meta)

    def wait_all_left(self, timeout_s: float, stop: threading.Event | None = None) -> None:
        """Wait until every worker that joined, and at least ``--workers`` of them, has left, or
        ``stop`` is set (checked every 0.2 s).

        The count matters after a restart past the last round: the new process has seen no
        worker yet, and must not exit before they come back for their final pull.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not (self._left >= set(self._sources) and len(self._left) >= self.config.workers):
                left_s = deadline - time.monotonic()
                if left_s <= 0 or (stop is not None and stop.is_set()):
                    return
                self._left_cond.wait(min(left_s, 0.2))

    def save_checkpoint(self) -> None:
        """Checkpoint the body and the open round's index now, so ``--resume`` continues here.

        Takes the close lock, so it never interleaves with a round close; a no-op without
        ``--checkpoint-dir``. Round closes and abandons checkpoint on their own; this is for a stop.
        """
        with self._close_lock:
            self._checkpoint(self.coordinator.current_round().round_idx)

    @property
    def staged_upload_bytes(self) -> int:
        """Bytes held for open (uncommitted) uploads: at most one per worker."""
        with self._lock:
            return sum(rx.staged_bytes for _, _, rx in self._uploads.values())

    def write_final(self) -> None:
        """Append the final evaluation (reported by workers on Leave) to the metrics file."""
        line: dict[str, Any] = {
            "kind": "final",
            "round": self.config.rounds,
            "variant": self.config.variant,
            "eval": self.final_eval,
        }
        # Bytes after the last round: the final pulls workers make to evaluate the last body.
        per_worker = self._rounds.get(self.config.rounds, {})
        line["down_payload_bytes"] = sum(w.down.total().payload_bytes for w in per_worker.values())
        line["down_raw_bytes"] = sum(w.down.total().raw_bytes for w in per_worker.values())
        line["up_payload_bytes"] = sum(w.up.total().payload_bytes for w in per_worker.values())
        if self.config.metrics_path is not None:
            with open(self.config.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self.watchers.close()
        with self._lock:
            uploads, self._uploads = list(self._uploads.values()), {}
        for _, _, rx in uploads:
            rx.discard()  # removes their staging files
        self._aggregate.reset()  # and those committed but not folded yet
        if self._store is not None:
            self._store.close()
        if self._staging_tmp is not None:
            self._staging_tmp.cleanup()
