"""ExperimentConfig and its presets (``smoke`` for tests, ``cpu-small`` for a 2-core CPU)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dept_model.std import DEFAULT_TAU

VARIANTS: tuple[str, ...] = ("std", "glob", "trim", "spec", "spec-opt")
DEPT_VARIANTS: tuple[str, ...] = ("glob", "trim", "spec", "spec-opt")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """Everything one comparison fixes: sources, budget, model, seeds, evaluation sizes.

    Every variant trains the ``sources`` for ``rounds`` rounds of ``inner_steps`` steps per
    source (DEPT), or ``len(sources) * rounds * inner_steps`` steps of the same batch shape (STD).
    """

    preset: str
    sources: tuple[str, ...]
    heldout: tuple[str, ...]  # not trained on: out-of-distribution evaluation (test split)
    udhr: tuple[str, ...]  # UDHR parallel test texts, e.g. udhr_en
    variants: tuple[str, ...] = VARIANTS
    model: str = "tiny"
    rounds: int
    inner_steps: int
    batch_size: int = 8
    seq_len: int = 128
    vocab_size: int = 2048  # the global tokenizer (std, glob, trim, spec)
    source_vocab_size: int = 1024  # each source's own tokenizer (spec-opt)
    lr: float = 1e-3
    tau: float = DEFAULT_TAU
    seed: int = 0
    eval_batches: int = 4  # per-round validation batches (dept-worker --eval-batches; the STD curve)
    final_eval_batches: int = 16  # cap per split in the final evaluation
    codec_up: str = "int8"
    codec_down: str = "int8"
    threads: int = 1  # torch / OpenMP threads per process

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("an experiment needs at least one source")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {list(self.variants)}")
        overlap = set(self.sources) & set(self.heldout)
        if overlap:
            raise ValueError(f"held-out sources must not be trained on: {sorted(overlap)}")
        if min(self.vocab_size, self.source_vocab_size) < 258:
            raise ValueError("vocabularies need at least 258 tokens (256 bytes and 2 specials)")
        for name in ("rounds", "inner_steps", "batch_size", "seq_len", "eval_batches", "final_eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def std_steps(self) -> int:
        """STD's optimiser steps: the DEPT runs' total over all workers."""
        return len(self.sources) * self.rounds * self.inner_steps

    @property
    def tokens_per_source(self) -> int:
        """Tokens each DEPT worker trains on over the run."""
        return self.rounds * self.inner_steps * self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)


UDHR_ALL = ("udhr_en", "udhr_it", "udhr_la", "udhr_ms", "udhr_sr", "udhr_sw", "udhr_ur", "udhr_zh")

PRESETS: dict[str, ExperimentConfig] = {
    # A few minutes on a 2-core machine: two sources, two rounds, a tiny model.
    "smoke": ExperimentConfig(
        preset="smoke",
        sources=("sw", "en"),
        heldout=("la",),
        udhr=("udhr_en", "udhr_sw", "udhr_la"),
        rounds=2,
        inner_steps=4,
        batch_size=4,
        seq_len=64,
        vocab_size=512,
        source_vocab_size=320,
        eval_batches=2,
        final_eval_batches=2,
    ),
    # Four heterogeneous sources (English, Italian, Chinese and Python code), held-out Latin,
    # Malay and Serbian; about 11 minutes on an idle 2-core CPU.
    "cpu-small": ExperimentConfig(
        preset="cpu-small",
        sources=("en", "it", "zh", "code"),
        heldout=("la", "ms", "sr"),
        udhr=UDHR_ALL,
        rounds=16,
        inner_steps=60,
        batch_size=8,
        seq_len=128,
        vocab_size=4096,
        source_vocab_size=1024,
        lr=2e-3,
        eval_batches=4,
        final_eval_batches=16,
    ),
}


def preset(name: str) -> ExperimentConfig:
    """The named preset.

    Raises:
        ValueError: unknown name.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
