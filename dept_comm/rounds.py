"""Round protocol value types: run state, coordinator config and the snapshots it returns."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import xxhash


class RunState(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, kw_only=True, slots=True)
class CoordinatorConfig:
    """Round policy: how many rounds, who is waited for, and how long."""

    num_rounds: int
    expected_workers: int
    min_workers: int = 1  # quorum: commits needed to close a round at its deadline
    round_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 30.0  # e.g. 3 missed beats of a 10 s heartbeat
    upload_ttl_s: float = 600.0  # an open upload with no activity for this long is dropped
    max_workers: int | None = None  # live (online, not left) workers at most; None: no cap

    def __post_init__(self) -> None:
        if self.max_workers is not None and self.max_workers < self.expected_workers:
            raise ValueError(
                f"max_workers must be at least expected_workers={self.expected_workers}, got {self.max_workers}"
            )
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be at least 1, got {self.num_rounds}")
        if self.expected_workers < 1:
            raise ValueError(f"expected_workers must be at least 1, got {self.expected_workers}")
        if not 1 <= self.min_workers <= self.expected_workers:
            raise ValueError(
                f"min_workers must be in [1, expected_workers={self.expected_workers}], got {self.min_workers}"
            )
        for key in ("round_timeout_s", "heartbeat_timeout_s", "upload_ttl_s"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be positive and finite, got {value}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundState:
    """The run as workers see it: the open round, the body version and digest."""

    round_idx: int
    version: int
    state: RunState
    digest: bytes
    deadline_unix_s: float | None  # None while nobody is admitted to the round

    @property
    def finished(self) -> bool:
        return self.state is RunState.FINISHED


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerInfo:
    """A snapshot of one worker's registration."""

    worker_id: str
    name: str
    source_id: str
    variant: str
    vocab_digest: str
    online: bool
    admitted_round: int  # the round this worker may push to (the current one, or the next)


@dataclass(frozen=True, kw_only=True, slots=True)
class CommitInfo:
    """One counted contribution."""

    worker_id: str
    source_id: str
    upload_id: str
    train_loss: float | None
    committed_at_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundRecord:
    """A snapshot of one round's bookkeeping, for metrics and for folding at close."""

    round_idx: int
    base_version: int  # the body version the round trains from
    outcome: str  # "open", "closed" or "abandoned"
    opened_at_s: float
    deadline_unix_s: float | None
    ended_at_s: float | None
    members: tuple[str, ...]  # sorted worker ids admitted to the round
    commits: tuple[CommitInfo, ...]  # sorted by worker id


def worker_id_for(name: str) -> str:
    """The stable worker id of a worker name (the same across worker and server restarts)."""
    return "w-" + xxhash.xxh3_64_hexdigest(name.encode())[:12]
