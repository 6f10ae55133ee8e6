"""WorkerConfig: every knob of dept-worker, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    device: str = "cpu"
    data: str | None = None  # catalog spec; default: the embedded corpus for the source
    vocab: Path | None = None  # tokenizer.json; glob/trim need the server's global one
    vocab_size: int = 2048  # when the worker trains its own tokenizer (spec, spec-opt)
    state_dir: Path | None = None
    eval_batches: int = 4
    seed: int = 0
    token: str | None = None
    rpc_timeout_s: float = 60.0
    compile: bool = False

    def __post_init__(self) -> None:
        if ":" not in self.server:
            raise ValueError(f"server must be HOST:PORT, got {self.server!r}")
        if not self.source:
            raise ValueError("source must be a non-empty source id, e.g. sw")
        for field, value in (("inner_steps", self.inner_steps), ("batch_size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{field} must be >= 1, got {value}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8, got {self.seq_len}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")

    @property
    def worker_name(self) -> str:
        return self.name or self.source

    @property
    def data_spec(self) -> str:
        """Where the source's text comes from: --data, or the embedded corpus."""
        return self.data or self.source
