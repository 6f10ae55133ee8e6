"""Model shape configuration (the shared body's hyper-parameters) and named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NORMS = ("layernorm", "rmsnorm")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape of the shared transformer body.

    The vocabulary size is deliberately absent: it belongs to each source's embeddings.
    ``d_ff=0`` means ``4 * d_model`` and is resolved at construction, so ``d_ff`` is always > 0
    afterwards (use ``dataclasses.replace(cfg, d_model=..., d_ff=0)`` to re-derive it).
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int = 0
    max_seq_len: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    init_std: float = 0.02
    bias: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_ff < 0:
            raise ValueError(f"d_ff must be >= 0 (0 means 4 * d_model), got {self.d_ff}")
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly field mapping (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping such as :meth:`to_dict`'s output.

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**dict(data))


# Paper (Sec. 4): sequence length 2048, MPT-125M/350M/1B recipes; 1.3B = 24 x 2048.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(n_layers=2, d_model=64, n_heads=4, max_seq_len=128),
    "small": ModelConfig(n_layers=4, d_model=256, n_heads=4, max_seq_len=256),
    "125m": ModelConfig(n_layers=12, d_model=768, n_heads=12, max_seq_len=2048),
    "350m": ModelConfig(n_layers=24, d_model=1024, n_heads=16, max_seq_len=2048),
    "1.3b": ModelConfig(n_layers=24, d_model=2048, n_heads=16, max_seq_len=2048),
}


def model_preset(name: str) -> ModelConfig:
    """Return the named preset (``tiny``, ``small``, ``125m``, ``350m``, ``1.3b``).

    Raises:
        ValueError: if the name is unknown.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}") from None
