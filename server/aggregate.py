"""One round's running sums: worker deltas folded as they commit, averaged at close.

The sums are float64 and the mean is rounded to float32 once, at close. A handful of fp32
addends (weighted by small integers) sum exactly in float64 in practice, so the result does not
depend on the order in which commits arrive: a run with a fixed seed gives the same body
whatever the network timing (fp32 running sums differ in the last bits between orders).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping

import torch

from dept_comm.names import EMB_IDS, EMB_ROWS, EMB_WEIGHT

from .config import OUTER_WEIGHTINGS


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
    """Fold committed updates into float64 sums so memory stays O(model), not O(workers x model).

    Dense tensors (body; glob's whole embedding matrix) are averaged over the workers that
    committed; trim rows are averaged per global token over the sources that have that token,
    and rows no committed source has get a zero delta (they stay unchanged under FedAvg). With
    ``weighting="tokens"`` each update counts in proportion to the tokens it was trained on.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        trim_rows: tuple[int, int] | None,
        weighting: str = "uniform",
    ) -> None:
        contribution_weight(weighting, 1)  # validates the name
        self._dense_shapes = {k: v for k, v in shapes.items() if not (trim_rows and k == EMB_WEIGHT)}
        self._trim_rows = trim_rows
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
                    self._sums[name] = delta.detach().to(torch.float64).mul_(weight)
                elif weight == 1.0:
                    acc.add_(delta.detach())  # promoted to float64 element by element, no temporary
                else:
                    acc.add_(delta.detach().to(torch.float64).mul_(weight))
                del delta
                self._weights[name] = self._weights.get(name, 0.0) + weight
            if self._trim_rows is not None:
                self._fold_rows(rows[EMB_IDS], rows[EMB_ROWS], weight)
            self.num_contributions += 1

    def _fold_rows(self, ids: torch.Tensor, rows: torch.Tensor, weight: float) -> None:
        assert self._trim_rows is not None
        if self._row_sums is None or self._row_weights is None:
            self._row_sums = torch.zeros(self._trim_rows, dtype=torch.float64)
            self._row_weights = torch.zeros(self._trim_rows[0], dtype=torch.float64)
        idx = ids.to(torch.int64)
        # ids are unique within one upload (checked by the codec's manifest), so each row is touched once.
        self._row_sums.index_add_(0, idx, rows.detach().to(torch.float64) * weight)
        self._row_weights.index_add_(0, idx, torch.full((idx.numel(),), weight, dtype=torch.float64))

    def mean(self) -> dict[str, torch.Tensor]:
        """The (weighted) averaged delta per shared tensor name, float32."""
        with self._lock:
            out = {name: (acc / self._weights[name]).to(torch.float32) for name, acc in self._sums.items()}
            if self._trim_rows is not None:
                out[EMB_WEIGHT] = self._row_mean()
            return out

    def _row_mean(self) -> torch.Tensor:
        assert self._trim_rows is not None
        dense = torch.zeros(self._trim_rows, dtype=torch.float32)
        if self._row_sums is not None and self._row_weights is not None:
            ids = torch.nonzero(self._row_weights > 0).flatten()
            if ids.numel():
                rows = self._row_sums[ids] / self._row_weights[ids].unsqueeze(1)
                dense.index_copy_(0, ids, rows.to(torch.float32))
        return dense

    def take_means(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The same means as ``mean()``, one tensor at a time, each float64 sum freed as its mean
        is made: closing a round never holds the sums and the means of the whole body at once.
        The aggregate is reset afterwards (also when the consumer stops early)."""
        try:
            for name in list(self._sums):
                with self._lock:
                    acc = self._sums.pop(name)
                    weight = self._weights[name]
                mean = acc.div_(weight).to(torch.float32)  # in place: the same values as acc / weight
                del acc
                yield name, mean
            if self._trim_rows is not None:
                with self._lock:
                    dense = self._row_mean()
                    self._row_sums = self._row_weights = None
                yield EMB_WEIGHT, dense
        finally:
            self.reset()
