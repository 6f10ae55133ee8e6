"""DEPT variants (GLOB, TRIM, SPEC, SPEC-OPT and the STD baseline): model builders and the STD source mixture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import torch

from dept_model.config import ModelConfig
from dept_model.embeddings import GlobalEmbeddings, SpecEmbeddings, TiedEmbeddings, TrimEmbeddings
from dept_model.model import Body, DeptModel

# Shapes: B batch, T sequence.


class Variant(StrEnum):
    """How a source's embeddings relate to the others' (see DEPT.md)."""

    GLOB = "glob"
    TRIM = "trim"
    SPEC = "spec"
    SPEC_OPT = "spec-opt"
    STD = "std"


def shares_embeddings(variant: Variant) -> bool:
    """True when the embeddings are shared across sources (and so cross the wire): GLOB, TRIM, STD."""
    return variant in (Variant.GLOB, Variant.TRIM, Variant.STD)


def uses_global_vocab(variant: Variant) -> bool:
    """True when every source uses the one global tokenizer (all but SPEC-OPT)."""
    return variant is not Variant.SPEC_OPT


def build_model(
    config: ModelConfig,
    variant: Variant,
    *,
    vocab_size: int,
    source_ids: torch.Tensor | None = None,
    seed: int,
    loss_chunk_tokens: int | None = None,
) -> DeptModel:
    """Build the body and the embeddings a worker of this variant holds.

    Args:
        config: body shape.
        variant: the DEPT variant.
        vocab_size: the tokenizer's size (global; for SPEC-OPT the source's own tokenizer).
        source_ids: TRIM only: sorted unique global ids ``V_k`` occurring in the source.
        seed: initial weights. The body and shared embeddings depend only on it, so every worker
            and the server agree; for SPEC/SPEC-OPT pass a per-source seed to get a private matrix.
        loss_chunk_tokens: tokens per cross-entropy chunk (None: sized to the vocabulary and device).

    Raises:
        ValueError: if ``source_ids`` is missing for TRIM or given for another variant.
    """
    variant = Variant(variant)
    if (variant is Variant.TRIM) != (source_ids is not None):
        raise ValueError(f"source_ids is required for TRIM and only for TRIM (variant={variant})")
    body = Body(config, seed=seed)
    emb_seed = seed + 1  # decorrelate the embedding draw from the body's
    embeddings: TiedEmbeddings
    if variant is Variant.TRIM:
        assert source_ids is not None
        embeddings = TrimEmbeddings(
            source_ids, config.d_model, vocab_size=vocab_size, init_std=config.init_std, seed=emb_seed
        )
    elif shares_embeddings(variant):
        embeddings = GlobalEmbeddings(vocab_size, config.d_model, init_std=config.init_std, seed=emb_seed)
    else:
        embeddings = SpecEmbeddings(vocab_size, config.d_model, emb_seed, init_std=config.init_std)
    return DeptModel(body, embeddings, loss_chunk_tokens=loss_chunk_tokens)


def temperature_weights(sizes: Sequence[int], tau: float) -> list[float]:
    """Temperature sampling probabilities ``p_k ∝ n_k^(1/tau)`` (tau=1: proportional, large tau: uniform).

    Raises:
        ValueError: on an empty list, non-positive sizes or ``tau <= 0``.
    """
    if not sizes:
        raise ValueError("sizes must not be empty")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if any(n <= 0 for n in sizes):
        raise ValueError(f"sizes must be positive, got {list(sizes)}")
    logw = np.log(np.asarray(sizes, dtype=np.float64)) / tau
    w = np.exp(logw - logw.max())
    return [float(p) for p in w / w.sum()]


class BatchSource(Protocol):
    """Anything with ``next_batch() -> (x_BT, y_BT)`` (e.g. ``dept_model.data.TokenBatches``)."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class MixtureBatches:
    """STD baseline: each batch comes from one source drawn with fixed probabilities.

    ``last_source`` holds the index of the source of the latest batch. ``state_dict()`` is
    JSON-friendly and includes each source's own state when it has ``state_dict``.
    """

    def __init__(self, sources: Sequence[BatchSource], weights: Sequence[float], *, seed: int) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError(
                f"need one weight per source, got {len(sources)} sources, {len(weights)} weights"
            )
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or not w.sum() > 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
        self.sources = list(sources)
        self.weights = w / w.sum()
        self.last_source = -1
        self._rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x_BT, y_BT)`` from a source drawn by weight."""
        self.last_source = int(self._rng.choice(len(self.sources), p=self.weights))
        return self.sources[self.last_source].next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Sampler position (JSON-friendly) plus each source's state where it has one."""
        return {
            "rng": self._rng.bit_generator.state,
            "last_source": self.last_source,
            "sources": [s.state_dict() if hasattr(s, "state_dict") else None for s in self.sources],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        self._rng.bit_generator.state = dict(state["rng"])
        self.last_source = int(state["last_source"])
        for source, sub in zip(self.sources, state["sources"], strict=True):
            if sub is not None:
                source.load_state_dict(sub)  # type: ignore[attr-defined]
