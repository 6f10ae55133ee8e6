"""fp32 accumulators that fold committed updates as they are decoded, in O(model) memory.

Float addition is not associative: the same contributions folded in another order can differ in
the last bits. Each accumulator is deterministic for a given fold order, so a server that wants
bit-reproducible rounds (the same committed set gives the same bytes, whatever the network
timing) folds in a fixed order, e.g. buffers each upload's encoded bytes and folds them in
worker-id order at close with :func:`fold_in_key_order`. Folding eagerly as commits arrive is
cheaper in memory but ties the result's last bits to arrival order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import torch

from dept_comm.errors import ConflictError, InvalidInputError, ManifestMismatchError, NonFiniteError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _check_weight(weight: float) -> None:
    if not (math.isfinite(weight) and weight > 0):
        raise InvalidInputError(f"contribution weight must be positive and finite, got {weight}")


def _check_finite(what: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise InvalidInputError(f"{what} must be floating point, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} holds NaN or Inf")


class DenseAccumulator:
    """Weighted sums of whole tensors, one fp32 buffer per name, allocated on first use.

    ``mean()`` is ``Σ w_i·Δ_i / Σ w_i`` per tensor, over the contributions that tensor received.
    Not thread-safe: one folding thread per accumulator (or the caller's lock).

    Args:
        shapes: every tensor name that may be added, with its shape.
        device: where the fp32 sums live.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], *, device: torch.device | str = "cpu") -> None:
        self._shapes: dict[str, tuple[int, ...]] = {
            name: tuple(int(s) for s in shape) for name, shape in shapes.items()
        }
        self._device = torch.device(device)
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def _validate(self, name: str, delta: torch.Tensor) -> None:
        shape = self._shapes.get(name)
        if shape is None:
            raise ManifestMismatchError(f"tensor {name!r} is not in the accumulator's manifest")
        if tuple(delta.shape) != shape:
            raise ManifestMismatchError(f"tensor {name!r} has shape {tuple(delta.shape)}, expected {shape}")
        _check_finite(f"tensor {name!r}", delta)

    def _fold(self, name: str, delta: torch.Tensor, weight: float) -> None:
        d = delta.detach().to(self._device, torch.float32)
        acc = self._sums.get(name)
        if acc is None:
            self._sums[name] = d * weight if weight != 1.0 else d.clone()
        elif weight == 1.0:
            acc.add_(d)
        else:
            acc.add_(d, alpha=weight)
        self._weights[name] = self._weights.get(name, 0.0) + weight
        self._counts[name] = self._counts.get(name, 0) + 1

    def add(self, name: str, delta: torch.Tensor, weight: float = 1.0) -> None:
        """Fold one tensor of one contribution.

        Raises:
            ManifestMismatchError: unknown name or wrong shape.
            NonFiniteError: NaN or Inf in ``delta``.
            InvalidInputError: a non-float tensor or a weight that is not positive and finite.
        """
        _check_weight(weight)
        self._validate(name, delta)
        self._fold(name, delta, weight)

    def add_all(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Fold a whole contribution, all or nothing: every tensor is validated before any is folded.

        Raises:
            Same as :meth:`add`; on error nothing of this contribution was folded.
        """
        _check_weight(weight)
        for name, delta in tensors.items():
            self._validate(name, delta)
        for name, delta in tensors.items():
            self._fold(name, delta, weight)

    @property
    def contributors(self) -> int:
        """The largest number of contributions any one tensor received (0 when empty)."""
        return max(self._counts.values(), default=0)

    def count(self, name: str) -> int:
        """How many contributions tensor ``name`` received."""
        return self._counts.get(name, 0)

    def mean(self) -> dict[str, torch.Tensor]:
        """Weighted mean per tensor, only for tensors that received at least one contribution."""
        return {name: acc / self._weights[name] for name, acc in self._sums.items()}

    def reset(self) -> None:
        """Forget every contribution (buffers are freed)."""
        self._sums.clear()
        self._weights.clear()
        self._counts.clear()


class RowAccumulator:
    """Per-row sums over a ``[num_rows, dim]`` matrix for TRIM embeddings.

    Each source sends the rows of the global ids it holds. A row's mean is taken only over the
    sources that sent it (zero padding of absent rows never dilutes it); rows that no source sent
    are not returned, and the caller leaves them unchanged. Memory: one fp32 ``[num_rows, dim]``
    buffer plus one weight per row, allocated on the first add.
    """

    def __init__(self, num_rows: int, dim: int, *, device: torch.device | str = "cpu") -> None:
        if num_rows <= 0 or dim <= 0:
            raise ValueError(f"num_rows and dim must be positive, got {num_rows}, {dim}")
        self.num_rows = num_rows
        self.dim = dim
        self._device = torch.device(device)
        self._sums: torch.Tensor | None = None  # [num_rows, dim] fp32
        self._weights: torch.Tensor | None = None  # [num_rows] fp32, Σ w over sources having the row
        self._contributors = 0

    def _validate(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise InvalidInputError(
                f"row ids must be a 1-D int64 tensor, got {ids.dtype} with shape {tuple(ids.shape)}"
            )
        if tuple(rows.shape) != (ids.numel(), self.dim):
            raise ManifestMismatchError(
                f"rows have shape {tuple(rows.shape)}, expected ({ids.numel()}, {self.dim}) for {ids.numel()} ids"
            )
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_rows:
                raise InvalidInputError(f"row ids out of range [0, {self.num_rows}): min {lo}, max {hi}")
            if torch.unique(ids).numel() != ids.numel():
                raise InvalidInputError("row ids must be unique within one contribution")
        _check_finite("embedding rows", rows)

    def add(self, ids: torch.Tensor, rows: torch.Tensor, weight: float = 1.0) -> None:
        """Fold one source's rows: ``ids`` [n] int64 global row ids, ``rows`` [n, dim].

        Raises:
            InvalidInputError: ids not 1-D int64, out of range or repeated; bad weight.
            ManifestMismatchError: ``rows`` is not ``[len(ids), dim]``.
            NonFiniteError: NaN or Inf in ``rows``.
        """
        _check_weight(weight)
        self._validate(ids, rows)
        if self._sums is None or self._weights is None:
            self._sums = torch.zeros(self.num_rows, self.dim, dtype=torch.float32, device=self._device)
            self._weights = torch.zeros(self.num_rows, dtype=torch.float32, device=self._device)
        idx = ids.to(self._device)
        r = rows.detach().to(self._device, torch.float32)
        # ids are unique, so index_add_ touches each row once: the result does not depend on
        # scatter order, only on the order of contributions.
        self._sums.index_add_(0, idx, r if weight == 1.0 else r * weight)
        self._weights.index_add_(0, idx, torch.full((idx.numel(),), weight, device=self._device))
        self._contributors += 1

    @property
    def contributors(self) -> int:
        """Number of contributions folded."""
        return self._contributors

    def row_counts(self) -> torch.Tensor:
        """Per-row sum of weights ([num_rows] fp32; the number of sources with unit weights)."""
        if self._weights is None:
            return torch.zeros(self.num_rows, dtype=torch.float32, device=self._device)
        return self._weights.clone()

    def mean_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [m] int64 ascending, mean rows [m, dim] fp32)`` for rows some contribution had."""
        if self._sums is None or self._weights is None:
            return (
                torch.empty(0, dtype=torch.int64, device=self._device),
                torch.empty(0, self.dim, dtype=torch.float32, device=self._device),
            )
        ids = torch.nonzero(self._weights > 0).flatten()
        return ids, self._sums[ids] / self._weights[ids].unsqueeze(1)

    def reset(self) -> None:
        """Forget every contribution (buffers are freed)."""
        self._sums = None
        self._weights = None
        self._contributors = 0


def fold_in_key_order(items: Iterable[tuple[str, T]], fold: Callable[[T], None]) -> list[str]:
    """Call ``fold(value)`` for each item in ascending key order; return the keys in that order.

    Use it to fold buffered contributions in a reproducible order (e.g. keyed by worker id), so
    the float sums do not depend on which upload finished first. ``value`` may be a thunk that
    decodes the upload only when folded, keeping one decoded contribution in memory at a time.

    Raises:
        ConflictError: two items share a key (one contribution per key).
    """
    buffered: dict[str, T] = {}
    for key, value in items:
        if key in buffered:
            raise ConflictError(f"two contributions share the key {key!r}")
        buffered[key] = value
    order = sorted(buffered)
    for key in order:
        fold(buffered.pop(key))
    return order
