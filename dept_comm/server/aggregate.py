"""One round's running sums: worker deltas folded in a canonical order, averaged at close.

The sums are float32 (one body's worth of memory) and each contribution is folded in ascending
worker-id order, whatever order the commits arrive in: float addition is not associative, so a
fixed order is what makes a run with a fixed seed give the same body bit for bit whatever the
network timing. A commit is folded at once when every round member with a smaller id has been
folded already; otherwise it waits, still encoded (in the staging area: memory within the
budget, else a file), until those have been folded or the round closes, when the rest is folded
in order. Before, the sums were float64 (twice the body) and folded on arrival.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Protocol

import torch

from dept_comm.names import EMB_IDS, EMB_ROWS

from .config import OUTER_WEIGHTINGS

logger = logging.getLogger(__name__)


class StagedUpdate(Protocol):
    """A committed, validated upload whose tensors are decoded when it is folded."""

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def discard(self) -> None: ...


def contribution_weight(weighting: str, num_tokens: int) -> float:
    """The FedAvg weight of one update: 1 (uniform, the paper's default) or its tokens.

    Raises:
        ValueError: unknown weighting, or ``tokens`` weighting with ``num_tokens < 1``.
    """
    if weighting == "uniform":
        return 1.0
    if weighting == "tokens":
        if num_tokens < 1:
            raise ValueError(f"outer weighting 'tokens' needs the commit's num_tokens >= 1, got {num_tokens}")
        return float(num_tokens)
    raise ValueError(f"outer weighting must be one of {OUTER_WEIGHTINGS}, got {weighting!r}")


class RoundAggregate:
    """Fold committed updates into float32 sums so memory stays O(model), not O(workers x model).

    ``fold`` adds one update now; ``submit`` queues a committed upload under its worker id and
    ``fold_ready`` folds queued uploads in ascending id order as far as no member with a smaller
    id is still to commit; ``take_means`` folds what is left (in order) and yields the means.

    Dense tensors (every tensor but ``row_subset``) are averaged over the workers that
    committed; the rows of ``row_subset`` (a 2-D tensor of which each worker sends only its own
    rows, as ``emb.rows`` with their ids ``emb.ids``: DEPT TRIM's embeddings) are averaged per row
    over the workers that have that row, and rows no committed worker has get a zero delta (they
    stay unchanged under FedAvg). With
    ``weighting="tokens"`` each update counts in proportion to the tokens it was trained on.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        row_subset: str | None = None,
        weighting: str = "uniform",
    ) -> None:
        """``shapes``: every global tensor's shape by name; ``row_subset``: the name of the 2-D
        tensor workers send rows of (None: none)."""
        contribution_weight(weighting, 1)  # validates the name
        self._dense_shapes = {k: v for k, v in shapes.items() if k != row_subset}
        self._row_subset = row_subset
        self._rows_shape: tuple[int, int] | None = None
        if row_subset is not None:
            rows_shape = tuple(shapes[row_subset])
            if len(rows_shape) != 2:
                raise ValueError(f"row subset {row_subset!r} must be 2-D, got shape {rows_shape}")
            self._rows_shape = (rows_shape[0], rows_shape[1])
        self.weighting = weighting
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._sums: dict[str, torch.Tensor] = {}
            self._weights: dict[str, float] = {}
            self._row_sums: torch.Tensor | None = None
            self._row_weights: torch.Tensor | None = None
            self.num_contributions = 0
            queued = list(getattr(self, "_queued", {}).values())
            self._queued: dict[str, tuple[StagedUpdate, int]] = {}
            self._folded: set[str] = set()
            self._last_folded = ""
            self.canonical = True
        for update, _ in queued:
            update.discard()

    @property
    def queued(self) -> int:
        """Committed uploads waiting for their turn to be folded."""
        with self._lock:
            return len(self._queued)

    def submit(self, key: str, update: StagedUpdate, *, num_tokens: int = 0) -> None:
        """Queue one committed upload under ``key`` (its worker id); ``fold_ready`` or
        ``take_means`` folds it in key order. The aggregate owns it from now on (``reset``
        discards what was not folded).

        Raises:
            ValueError: ``tokens`` weighting without tokens, or a key already submitted this round.
        """
        contribution_weight(self.weighting, num_tokens)
        with self._lock:
            if key in self._queued or key in self._folded:
                raise ValueError(f"{key!r} already contributed to this round")
            self._queued[key] = (update, num_tokens)

    def fold_ready(self, members: Collection[str]) -> int:
        """Fold queued uploads in ascending key order while no member (of ``members``) with a
        smaller key is still to commit; returns how many were folded."""
        done = 0
        while True:
            with self._lock:
                if not self._queued:
                    return done
                key = min(self._queued)
                waiting = [m for m in members if m < key and m not in self._folded and m not in self._queued]
                if waiting:
                    return done
            self._fold_queued(key)
            done += 1

    def _fold_queued(self, key: str) -> None:
        with self._lock:
            update, num_tokens = self._queued.pop(key)
            if key < self._last_folded:
                # Only when a member with a smaller id joined the round after larger ones were
                # folded: the sums are right, but their last bits may depend on that timing.
                self.canonical = False
                logger.warning("fold_order_not_canonical key=%s after=%s", key, self._last_folded)
            self._folded.add(key)
            self._last_folded = max(self._last_folded, key)
        try:
            self.fold(update.named_tensors(), num_tokens=num_tokens)
        except BaseException:
            update.discard()
            raise

    def fold_all(self) -> None:
        """Fold every queued upload, in ascending key order."""
        while True:
            with self._lock:
                if not self._queued:
                    return
                key = min(self._queued)
            self._fold_queued(key)

    def fold(
        self, update: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *, num_tokens: int = 0
    ) -> None:
        """Add one verified worker update (validated against its manifest beforehand).

        Args:
            update: decoded deltas by wire name: a mapping, or (name, tensor) pairs decoded one at
                a time (e.g. from a staged upload), so that no full fp32 copy of an update exists.
            num_tokens: tokens the worker trained on this round (used by ``tokens`` weighting).

        Raises:
            ValueError: an unknown tensor or shape, or ``tokens`` weighting without tokens.
        """
        weight = contribution_weight(self.weighting, num_tokens)
        pairs = update.items() if isinstance(update, Mapping) else update
        rows: dict[str, torch.Tensor] = {}
        with self._lock:
            for name, delta in pairs:
                if name in (EMB_ROWS, EMB_IDS):
                    rows[name] = delta
                    continue
                shape = self._dense_shapes.get(name)
                if shape is None or tuple(delta.shape) != tuple(shape):
                    raise ValueError(
                        f"tensor {name!r} with shape {tuple(delta.shape)} is not in the manifest"
                    )
                acc = self._sums.get(name)
                if acc is None:
                    self._sums[name] = delta.detach().to(torch.float32, copy=True).mul_(weight)
                else:
                    acc.add_(delta.detach(), alpha=weight)
                del delta
                self._weights[name] = self._weights.get(name, 0.0) + weight
            if self._rows_shape is not None:
                self._fold_rows(rows[EMB_IDS], rows[EMB_ROWS], weight)
            self.num_contributions += 1

    def _fold_rows(self, ids: torch.Tensor, rows: torch.Tensor, weight: float) -> None:
        assert self._rows_shape is not None
        if self._row_sums is None or self._row_weights is None:
            self._row_sums = torch.zeros(self._rows_shape, dtype=torch.float32)
            self._row_weights = torch.zeros(self._rows_shape[0], dtype=torch.float64)
        idx = ids.to(torch.int64)
        # ids are unique within one upload (checked by the codec's manifest), so each row is touched
        # once: the result depends on the order of contributions only, which is canonical.
        self._row_sums.index_add_(0, idx, rows.detach().to(torch.float32), alpha=weight)
        self._row_weights.index_add_(0, idx, torch.full((idx.numel(),), weight, dtype=torch.float64))

    def mean(self) -> dict[str, torch.Tensor]:
        """The (weighted) averaged delta per shared tensor name, float32."""
        with self._lock:
            out = {name: acc / self._weights[name] for name, acc in self._sums.items()}
            if self._rows_shape is not None:
                out[self._row_name] = self._row_mean()
            return out

    @property
    def _row_name(self) -> str:
        assert self._row_subset is not None
        return self._row_subset

    def _row_mean(self) -> torch.Tensor:
        assert self._rows_shape is not None
        dense = torch.zeros(self._rows_shape, dtype=torch.float32)
        if self._row_sums is not None and self._row_weights is not None:
            ids = torch.nonzero(self._row_weights > 0).flatten()
            if ids.numel():
                rows = self._row_sums[ids] / self._row_weights[ids].to(torch.float32).unsqueeze(1)
                dense.index_copy_(0, ids, rows)
        return dense

    def take_means(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Fold what is queued (in key order), then the same means as ``mean()``, one tensor at a
        time, each sum turned into its mean in place: closing a round never holds the sums and the
        means of the whole body at once. The aggregate is reset afterwards (also when the consumer
        stops early)."""
        try:
            self.fold_all()
            for name in list(self._sums):
                with self._lock:
                    acc = self._sums.pop(name)
                    weight = self._weights[name]
                yield name, acc.div_(weight)  # in place: the same values as acc / weight
                del acc
            if self._rows_shape is not None:
                with self._lock:
                    dense = self._row_mean()
                    self._row_sums = self._row_weights = None
                yield self._row_name, dense
        finally:
            self.reset()
