"""WorkerConfig: every knob of dept-worker, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from dept_comm.parallel import DEFAULT_STREAMS, check_streams
from dept_comm.tls import channel_credentials, read_pem
from dept_model.attention import ATTN_IMPLS

from .device import check_device


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerConfig:
    """One worker: which server, which source, how it trains, where it keeps its state."""

    server: str
    source: str
    name: str | None = None  # stable identity; defaults to the source id
    inner_steps: int = 20
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    device: str = "auto"  # auto | cpu | cuda | cuda:K (worker.device); resolved before the run
    data: str | None = None  # catalog spec; default: the embedded corpus for the source
    vocab: Path | None = None  # tokenizer.json; glob/trim need the server's global one
    vocab_size: int = 2048  # when the worker trains its own tokenizer (spec, spec-opt)
    state_dir: Path | None = None
    eval_batches: int = 4
    seed: int = 0
    token: str | None = None
    tls_ca: Path | None = None  # PEM roots that verify the server; turns TLS on
    tls_cert: Path | None = None  # PEM client certificate, for a server that requires mutual TLS
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_server_name: str | None = None  # name the server certificate must carry, if not the host's
    rpc_timeout_s: float = 60.0
    reconnect_timeout_s: float = 300.0  # how long calls are retried while the server cannot be reached
    min_bandwidth_mbps: float = 1.0  # a pull or push slower than this for a whole chunk is stalled
    progress_interval_s: float = 10.0  # long pulls, pushes and inner-step loops log progress this often
    streams: int = DEFAULT_STREAMS  # concurrent gRPC streams per pull and push (dept_comm.parallel)
    compile: bool = False
    overlap: bool = False  # train round r+1 while round r's update travels (worker/overlap.py)
    attn: str = "auto"  # auto | flex | sdpa (dept_model.attention): ALiBi through FlexAttention or SDPA
    grad_accum: int = 1  # micro-batches per inner step (the batch is split; same step, less memory)
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    parallel: str = "auto"  # torchrun nodes: ddp | fsdp | auto (fsdp for the 1.3b preset)
    dist_timeout_s: float = 600.0  # torchrun nodes: bound on each collective and on rank 0's silence

    def __post_init__(self) -> None:
        if ":" not in self.server:
            raise ValueError(f"server must be HOST:PORT, got {self.server!r}")
        if not self.source:
            raise ValueError("source must be a non-empty source id, e.g. sw")
        if not self.progress_interval_s > 0:
            raise ValueError(f"progress_interval_s must be > 0, got {self.progress_interval_s}")
        check_streams(self.streams)
        if not self.min_bandwidth_mbps > 0:
            raise ValueError(f"min_bandwidth_mbps must be > 0, got {self.min_bandwidth_mbps}")
        for field, value in (("inner_steps", self.inner_steps), ("batch_size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{field} must be >= 1, got {value}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8, got {self.seq_len}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_device(self.device)
        if self.attn not in ATTN_IMPLS or self.grad_accum < 1:
            raise ValueError(
                f"attn must be one of {ATTN_IMPLS} and grad_accum >= 1, got {self.attn!r}, {self.grad_accum}"
            )
        if self.parallel not in ("auto", "ddp", "fsdp"):
            raise ValueError(f"parallel must be auto, ddp or fsdp, got {self.parallel!r}")
        if not self.reconnect_timeout_s >= 0:
            raise ValueError(f"reconnect_timeout_s must be >= 0, got {self.reconnect_timeout_s}")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        self._check_tls()

    def _check_tls(self) -> None:
        """TLS flags: cert and key together, both and the server name only with TLS on, files present."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: pass both or neither")
        if self.tls_ca is None:
            for flag, value in (("--tls-cert", self.tls_cert), ("--tls-server-name", self.tls_server_name)):
                if value is not None:
                    raise ValueError(f"{flag} needs --tls-ca (the CA that verifies the server turns TLS on)")
        if self.tls_server_name is not None and not self.tls_server_name.strip():
            raise ValueError("--tls-server-name must not be empty")
        named = [("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)]
        for flag, path in named:
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")

    @property
    def worker_name(self) -> str:
        return self.name or self.source

    @property
    def data_spec(self) -> str:
        """Where the source's text comes from: --data, or the embedded corpus."""
        return self.data or self.source

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials from the PEM files (client certificate included if given); None without TLS.

        Raises:
            ValueError: a file cannot be read or holds no PEM block.
        """
        if self.tls_ca is None:
            return None
        ca = read_pem(self.tls_ca, "--tls-ca")
        cert = read_pem(self.tls_cert, "--tls-cert") if self.tls_cert is not None else None
        key = read_pem(self.tls_key, "--tls-key") if self.tls_key is not None else None
        return channel_credentials(ca, cert, key)
