"""DEPT's ServerConfig: the generic parameter server's settings plus variant, model, vocabulary, seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dept_comm.server import config as generic
from dept_comm.server.config import OUTER_OPTIMIZERS, OUTER_WEIGHTINGS

__all__ = ["OUTER_OPTIMIZERS", "OUTER_WEIGHTINGS", "VARIANTS", "ServerConfig"]

VARIANTS = ("glob", "trim", "spec", "spec-opt")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig(generic.ServerConfig):
    """What dept-server runs: the generic server's settings (rounds, quorum, codecs, persistence,
    metrics, limits, security) and DEPT's variant, model preset, global vocabulary and seed.

    It is a :class:`dept_comm.server.ServerConfig` itself; ``dept_server.hooks`` builds the DEPT
    hooks (join check, resume identity, TRIM's rows) that go with it.
    """

    variant: str = "spec"
    model: str = "tiny"
    vocab: Path | None = None  # global tokenizer.json (glob/trim)
    seed: int = 0

    def __post_init__(self) -> None:
        self._check()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant in ("glob", "trim") and self.vocab is None:
            raise ValueError(
                f"variant {self.variant} shares embeddings: pass --vocab (a global tokenizer.json)"
            )

    @property
    def shares_embeddings(self) -> bool:
        return self.variant in ("glob", "trim")
