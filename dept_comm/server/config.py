"""ServerConfig: every knob of a parameter server (any named tensors), validated once.

DEPT's own settings (variant, model, vocabulary, seed) extend it in ``dept_server.config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dept_comm.tls import read_pem

from .admission import pool_threads

OUTER_OPTIMIZERS = ("fedavg", "nesterov")
OUTER_WEIGHTINGS = ("uniform", "tokens")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """What the parameter server runs: rounds, quorum, the outer step, codecs, persistence, metrics,
    limits and security. Invalid values raise ``ValueError`` naming the field (or its flag)."""

    host: str = "127.0.0.1"
    port: int = 50051
    rounds: int = 3
    workers: int = 2  # expected per round
    min_workers: int | None = None  # quorum; None = all expected workers
    round_timeout_s: float = 600.0
    outer: str = "fedavg"
    outer_lr: float | None = None  # None: 1.0 for fedavg, 0.7 for nesterov
    outer_momentum: float | None = None  # None: 0.9 for nesterov
    outer_weighting: str = "uniform"  # FedAvg weights: uniform (the paper) or tokens per worker
    codec_up: str = "int4"  # the measured frontier: README, Codec quality
    codec_down: str = "int4"
    checkpoint_dir: Path | None = None
    resume: bool = False
    metrics_path: Path | None = None
    metrics_port: int | None = None
    heartbeat_timeout_s: float = 60.0  # a worker silent this long is dropped from the round it is in
    max_workers: int = 256  # live workers at most; a further join is refused
    max_streams: int = 32  # pulls and pushes in flight at once; more are refused with a retry hint
    max_workers_threads: int | None = None  # RPC pool threads; None: sized from max_streams
    max_update_norm_ratio: float = 10.0  # refuse an update whose norm is over this x the round's; 0: off
    tokens_file: Path | None = None  # per-worker tokens: one "name token" per line
    grace_s: float = 5.0
    token: str | None = None  # shared secret workers must present
    tls_cert: Path | None = None  # PEM certificate chain: the port speaks TLS only (with tls_key)
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_client_ca: Path | None = None  # PEM CA: require client certificates it signed (mutual TLS)
    linger_s: float = 0.0  # after the last round, keep serving --metrics-port for a final scrape
    staging_memory_mib: int | None = None  # encoded bytes of open uploads in memory (None: 1/4 body)
    stream_window_kib: int = 1024  # HTTP/2 receive window per stream: caps unread bytes per upload
    staging_dir: Path | None = None  # None: <checkpoint_dir>/staging, else a temp dir

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """Validate every field (subclasses call it, then check their own)."""
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
        if self.outer not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer must be one of {OUTER_OPTIMIZERS}, got {self.outer!r}")
        if self.outer_weighting not in OUTER_WEIGHTINGS:
            raise ValueError(
                f"outer_weighting must be one of {OUTER_WEIGHTINGS}, got {self.outer_weighting!r}"
            )
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if not 0 < self.heartbeat_timeout_s < float("inf"):
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {self.heartbeat_timeout_s}")
        if self.max_workers < self.workers:
            raise ValueError(
                f"--max-workers ({self.max_workers}) must be at least --workers ({self.workers})"
            )
        if self.max_streams < 1:
            raise ValueError(f"--max-streams must be >= 1, got {self.max_streams}")
        if self.max_workers_threads is not None and self.max_workers_threads < 1:
            raise ValueError(f"max_workers_threads must be >= 1, got {self.max_workers_threads}")
        ratio = self.max_update_norm_ratio
        if not (ratio == 0 or 1 < ratio < float("inf")):
            raise ValueError(f"--max-update-norm-ratio must be 0 (off) or > 1, got {ratio}")
        if self.tokens_file is not None and self.token is not None:
            raise ValueError(
                "--tokens (a token per worker name) and --token (one shared token) exclude each other"
            )
        if self.tokens_file is not None and not self.tokens_file.is_file():
            raise ValueError(f"--tokens {self.tokens_file}: no such file")
        if self.staging_memory_mib is not None and self.staging_memory_mib < 0:
            raise ValueError(f"staging_memory_mib must be >= 0, got {self.staging_memory_mib}")
        if not 64 <= self.stream_window_kib <= 1 << 20:
            raise ValueError(f"stream_window_kib must be in [64, 1048576], got {self.stream_window_kib}")
        self._check_tls()

    def _check_tls(self) -> None:
        """TLS paths: cert and key together, a client CA only with them, every file present."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: pass both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for flag, path in self._tls_paths():
            if not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")

    def _tls_paths(self) -> list[tuple[str, Path]]:
        named = [
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
        ]
        return [(flag, path) for flag, path in named if path is not None]

    @property
    def rpc_threads(self) -> int:
        """The RPC pool: ``max_workers_threads`` if set, else sized from the stream slots."""
        return self.max_workers_threads or pool_threads(self.max_streams)

    @property
    def quorum(self) -> int:
        """Commits a round needs to close at its deadline (``min_workers``, else ``workers``)."""
        return self.workers if self.min_workers is None else self.min_workers

    @property
    def tls(self) -> bool:
        """Whether the port speaks TLS (``tls_cert`` is set)."""
        return self.tls_cert is not None

    def tls_pems(self) -> tuple[bytes, bytes, bytes | None] | None:
        """(certificate chain, key, client CA or None) read from the TLS files; None without TLS.

        Raises:
            ValueError: a file cannot be read or holds no PEM block.
        """
        if self.tls_cert is None or self.tls_key is None:
            return None
        cert = read_pem(self.tls_cert, "--tls-cert")
        key = read_pem(self.tls_key, "--tls-key")
        ca = read_pem(self.tls_client_ca, "--tls-client-ca") if self.tls_client_ca is not None else None
        return cert, key, ca
