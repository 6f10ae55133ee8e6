"""ServerConfig: every knob of dept-server, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VARIANTS = ("glob", "trim", "spec", "spec-opt")
OUTER_OPTIMIZERS = ("fedavg", "nesterov")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """What the coordinator runs: rounds, quorum, variant, model, codecs, persistence, metrics."""

    host: str = "127.0.0.1"
    port: int = 50051
    rounds: int = 3
    workers: int = 2  # expected per round
    min_workers: int | None = None  # quorum; None = all expected workers
    round_timeout_s: float = 600.0
    variant: str = "spec"
    model: str = "tiny"
    vocab: Path | None = None  # global tokenizer.json (glob/trim)
    outer: str = "fedavg"
    outer_lr: float | None = None  # None: 1.0 for fedavg, 0.7 for nesterov
    outer_momentum: float | None = None  # None: 0.9 for nesterov
    codec_up: str = "int8"
    codec_down: str = "int8"
    checkpoint_dir: Path | None = None
    resume: bool = False
    metrics_path: Path | None = None
    metrics_port: int | None = None
    seed: int = 0
    heartbeat_timeout_s: float = 60.0
    max_workers_threads: int = 32
    grace_s: float = 5.0
    token: str | None = None  # shared secret workers must present
    linger_s: float = 0.0  # after the last round, keep serving --metrics-port for a final scrape

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.workers:
            raise ValueError(f"min_workers must be in [1, workers={self.workers}], got {self.min_workers}")
        if self.round_timeout_s <= 0:
            raise ValueError(f"round_timeout_s must be > 0, got {self.round_timeout_s}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.outer not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer must be one of {OUTER_OPTIMIZERS}, got {self.outer!r}")
        if self.variant in ("glob", "trim") and self.vocab is None:
            raise ValueError(
                f"variant {self.variant} shares embeddings: pass --vocab (a global tokenizer.json)"
            )
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")

    @property
    def quorum(self) -> int:
        return self.workers if self.min_workers is None else self.min_workers

    @property
    def shares_embeddings(self) -> bool:
        return self.variant in ("glob", "trim")
