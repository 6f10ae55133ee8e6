"""One round's running sums: worker deltas folded as they commit, averaged at close."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from dept_comm.accumulate import DenseAccumulator, RowAccumulator
from dept_comm.names import EMB_IDS, EMB_ROWS, EMB_WEIGHT


class RoundAggregate:
    """Fold committed updates into fp32 sums so memory stays O(model), not O(workers x model).

    Dense tensors (body; glob's whole embedding matrix) are averaged over the workers that
    committed; trim rows are averaged per global token over the sources that have that token,
    and rows no committed source has get a zero delta (they stay unchanged under FedAvg).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, trim_rows: tuple[int, int] | None) -> None:
        self._dense_shapes = {k: v for k, v in shapes.items() if not (trim_rows and k == EMB_WEIGHT)}
        self._trim_rows = trim_rows
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._dense = DenseAccumulator(self._dense_shapes)
            self._rows = RowAccumulator(*self._trim_rows) if self._trim_rows else None
            self.num_contributions = 0

    def fold(self, update: Mapping[str, torch.Tensor]) -> None:
        """Add one verified worker update (validated against its manifest beforehand)."""
        with self._lock:
            for name, delta in update.items():
                if name in (EMB_ROWS, EMB_IDS):
                    continue
                self._dense.add(name, delta)
            if self._rows is not None:
                self._rows.add(update[EMB_IDS], update[EMB_ROWS])
            self.num_contributions += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The averaged delta per shared tensor name."""
        with self._lock:
            out = dict(self._dense.mean())
            if self._rows is not None and self._trim_rows is not None:
                dense = torch.zeros(self._trim_rows, dtype=torch.float32)
                ids, rows = self._rows.mean_rows()
                if ids.numel():
                    dense.index_copy_(0, ids, rows)
                out[EMB_WEIGHT] = dense
            return out
