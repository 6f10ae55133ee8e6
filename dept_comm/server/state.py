"""The state every part of ServerApp shares (declared here for the type checker), and the small
lookups they all use: the round info, a worker's counted upload and per-round accounting."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from dept_comm.accounting import ByteMeter, RoundMetrics
from dept_comm.checkpoint import CheckpointStore
from dept_comm.coordinator import RoundCoordinator
from dept_comm.errors import (
    NotFoundError,
)
from dept_comm.pb import service_pb2
from dept_comm.readahead import ReadAhead
from dept_comm.staging import StagingArea
from dept_comm.streaming import StreamReceiver

from .aggregate import RoundAggregate
from .config import ServerConfig
from .hooks import ServerHooks
from .model_state import GlobalModel
from .norm_guard import NormGuard
from .sessions import JoinPolicy, Sessions
from .watch import RoundWatchers

logger = logging.getLogger(__name__)


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """Worker-reported metrics without NaN/Inf (they cannot go into JSON checkpoints)."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


@dataclass
class WorkerRound:
    """Per worker, per round: bytes each way and what it reported."""

    source: str
    up: ByteMeter = field(default_factory=ByteMeter)
    down: ByteMeter = field(default_factory=ByteMeter)
    train_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class AppState:
    """ServerApp's fields (set by ``ServerApp.__init__``) and the lookups its parts share."""

    config: ServerConfig
    hooks: ServerHooks
    model: GlobalModel
    coordinator: RoundCoordinator
    sessions: Sessions
    join_policy: JoinPolicy
    staging: StagingArea
    watchers: RoundWatchers
    records: list[RoundMetrics]
    final_eval: dict[str, dict[str, float]]
    finished: threading.Event
    run_info: dict[str, Any]
    _store: CheckpointStore | None
    _aggregate: RoundAggregate
    _norm_guard: NormGuard
    _body_norm_at: tuple[int, float]
    _lock: threading.Lock
    _close_lock: threading.Lock
    _checks: threading.BoundedSemaphore
    _check_pool: ThreadPoolExecutor
    read_ahead: ReadAhead
    _uploads: dict[str, tuple[str, int, StreamReceiver]]  # upload_id -> (worker, round, rx)
    _row_ids: dict[str, torch.Tensor]
    _sources: dict[str, str]
    _rounds: dict[int, dict[str, WorkerRound]]
    _round_started: float
    _full_model_fp32_bytes: int

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

    def _known(self, worker_id: str) -> None:
        if worker_id not in self._sources:
            raise NotFoundError(f"unknown worker {worker_id!r}; join first")

    def maybe_close(self) -> bool:
        """Close the open round when it is due (closing.py)."""
        raise NotImplementedError

    def _free_dropped_uploads(self) -> None:
        """Free the staging of dropped uploads (uploads.py)."""
        raise NotImplementedError
