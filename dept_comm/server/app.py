"""ServerApp: the parameter server's state and round logic, with no gRPC types beyond protobuf messages.

It runs rounds over any named tensors; what a trainer adds (join check, run description, resume
identity, a row subset, a label) comes in :class:`~dept_comm.server.hooks.ServerHooks`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from dept_comm.accounting import RoundMetrics, metered
from dept_comm.checkpoint import CheckpointStore
from dept_comm.codecs import codec_name
from dept_comm.coordinator import CoordinatorConfig, RoundCoordinator, worker_id_for
from dept_comm.errors import (
    ManifestMismatchError,
    NotFoundError,
    RunFinishedError,
)
from dept_comm.frames import StreamItem
from dept_comm.outer import build_outer
from dept_comm.parallel import stripe_of
from dept_comm.pb import service_pb2
from dept_comm.progress import InflightTransfers
from dept_comm.readahead import ReadAhead
from dept_comm.staging import StagingArea
from dept_comm.streaming import StreamReceiver

from .admission import WAIT_SLOTS, StreamSlots
from .aggregate import RoundAggregate
from .closing import RoundClosing
from .config import ServerConfig
from .hooks import ServerHooks, check_resume_identity
from .model_state import GlobalModel
from .norm_guard import NormGuard
from .sessions import JoinPolicy, Sessions, read_tokens
from .state import WorkerRound, _finite
from .uploads import CONCURRENT_CHECKS, READ_AHEAD_DEPTH, READ_AHEAD_STREAMS, UploadPath
from .watch import RoundWatchers

logger = logging.getLogger(__name__)

STAGING_AUTO_MIN_MIB = 16
STAGING_AUTO_MAX_MIB = 1024


def auto_staging_memory_mib(body_fp32_bytes: int) -> int:
    """The default --staging-memory-mib: a quarter of the fp32 body (about one int8-encoded
    upload), at least 16 and at most 1024 MiB; the rest of the open uploads wait in files."""
    return max(STAGING_AUTO_MIN_MIB, min(STAGING_AUTO_MAX_MIB, body_fp32_bytes // 4 >> 20))


def default_run_info(config: ServerConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The run description workers get at join when the hooks give none."""
    numel = sum(t.numel() for t in tensors.values())
    return {
        "rounds": config.rounds,
        "codec_up": config.codec_up,
        "codec_down": config.codec_down,
        "num_tensors": len(tensors),
        "params": numel,
        "full_model_fp32_bytes": 4 * numel,
    }


class ServerApp(UploadPath, RoundClosing):
    """Everything the server does between decoding a request and encoding the reply."""

    def __init__(
        self,
        config: ServerConfig,
        tensors: Mapping[str, torch.Tensor],
        hooks: ServerHooks | None = None,
        *,
        copy: bool = True,
    ) -> None:
        """``tensors``: the starting global tensors by name (float32 from here on). ``copy=False``:
        take them as they are (the caller keeps no reference and never writes them), which saves
        one copy of the model at start."""
        self.config = config
        self.hooks = hooks if hooks is not None else ServerHooks()
        self._store = CheckpointStore(config.checkpoint_dir) if config.checkpoint_dir else None
        outer = build_outer(config.outer, config.outer_lr, config.outer_momentum)
        try:
            self.model = GlobalModel(
                shared=dict(tensors),
                outer=outer,
                codec_down=config.codec_down,
                copy=copy,
                row_subset=self.hooks.row_subset,
                group_of=self.hooks.groups(),
            )
        except BaseException:
            if self._store is not None:
                self._store.close()
            raise
        shared = self.model.shared
        self.run_info: dict[str, Any] = (
            dict(self.hooks.run_info) if self.hooks.run_info is not None else default_run_info(config, shared)
        )
        # What standard data parallel would send every step (the trainer may know better).
        full = self.run_info.get("full_model_fp32_bytes", 4 * sum(t.numel() for t in shared.values()))
        self._full_model_fp32_bytes = int(full)
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
        self._aggregate = RoundAggregate(
            {k: tuple(v.shape) for k, v in shared.items()},
            row_subset=self.hooks.row_subset,
            weighting=config.outer_weighting,
        )
        self._staging_tmp: tempfile.TemporaryDirectory[str] | None = None
        self.staging = self._staging_area(config)
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        # Commits check their uploads at most this many at a time: each check holds a decoded
        # tensor and its temporaries, and the work is CPU-bound anyway (see docs/SCALE.md).
        self._checks = threading.BoundedSemaphore(CONCURRENT_CHECKS)
        # Uploads' tensors are checked there as they arrive, off the threads reading the streams.
        self._check_pool = ThreadPoolExecutor(CONCURRENT_CHECKS, thread_name_prefix="upload-check")
        # A few pushes at a time are read ahead of their handlers (dept_comm.readahead).
        self.read_ahead = ReadAhead(
            streams=READ_AHEAD_STREAMS, depth=READ_AHEAD_DEPTH, name="push-read-ahead"
        )
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
        check_resume_identity(meta, self.hooks.resume_identity, self.hooks.resume_labels)
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
        TLS): with ``--tokens`` or mTLS they must allow the worker's name. The join attributes
        go to ``hooks.admit``, which may refuse them.
        """
        self.join_policy.check(req.worker_name or req.source_id, bearer, cert_names)
        registration = self.hooks.admit(dict(req.attributes), req.attributes_schema) or ""
        for codec in (codec_name(self.config.codec_up), codec_name(self.config.codec_down)):
            if req.codecs and codec not in req.codecs:
                raise ManifestMismatchError(
                    f"worker cannot use codec {codec!r}; it offers {list(req.codecs)}"
                )
        name = req.worker_name or req.source_id
        try:
            worker_id = self.coordinator.join(name, req.source_id, self.hooks.label, registration).worker_id
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

    def pull(self, req: service_pb2.PullRequest) -> Iterator[StreamItem]:
        """The current version's down-link (built once at the round's close) from the chunk the
        request resumes at; no lock is held while it streams, and the body is never copied."""
        self._known(req.worker_id)
        row_ids = None
        if self.model.row_subset is not None:
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

    def wait_all_left(self, timeout_s: float | None, stop: threading.Event | None = None) -> bool:
        """Wait until every worker that joined, and at least ``--workers`` of them, has left, or
        ``stop`` is set (checked every 0.2 s), or ``timeout_s`` passed (None: no limit); True
        when they all left.

        The count matters after a restart past the last round: the new process has seen no
        worker yet, and must not exit before they come back for their final pull.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while not (self._left >= set(self._sources) and len(self._left) >= self.config.workers):
                left_s = 0.2 if deadline is None else deadline - time.monotonic()
                if left_s <= 0 or (stop is not None and stop.is_set()):
                    return False
                self._left_cond.wait(min(left_s, 0.2))
            return True

    @property
    def staged_upload_bytes(self) -> int:
        """Bytes held for open (uncommitted) uploads: at most one per worker."""
        with self._lock:
            return sum(rx.staged_bytes for _, _, rx in self._uploads.values())

    def close(self) -> None:
        self.watchers.close()
        with self._lock:
            uploads, self._uploads = list(self._uploads.values()), {}
        for _, _, rx in uploads:
            rx.discard()  # removes their staging files
        self._check_pool.shutdown(wait=True)
        self._aggregate.reset()  # and those committed but not folded yet
        if self._store is not None:
            self._store.close()
        if self._staging_tmp is not None:
            self._staging_tmp.cleanup()
