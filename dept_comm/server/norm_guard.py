"""A sanity guard on update norms (``--max-update-norm-ratio``); a guard, not Byzantine robustness.

An update whose L2 norm exceeds ``ratio`` times a reference is refused (``OutlierUpdateError``) and
logged. The reference is the median norm of the updates accepted so far in this round when there
are ``MIN_REFERENCE`` of them, else the median of the previous round's accepted updates, else (the
first updates of a run or of a restarted server) the norm of the body itself. It catches a broken
worker (a diverged replica, a units bug, a learning rate 100x too high); it does not stop a
colluding majority, small poisoned updates, or an attacker who knows the reference.
"""

from __future__ import annotations

import math
import statistics
import threading

from dept_comm.errors import OutlierUpdateError

MIN_REFERENCE = 2  # accepted updates in a round before their median becomes the reference


class NormGuard:
    """Checks update norms against the round's; ``ratio`` None or 0 turns the guard off."""

    def __init__(self, ratio: float | None) -> None:
        if ratio is not None and (not math.isfinite(ratio) or ratio < 0 or 0 < ratio <= 1):
            raise ValueError(f"max update norm ratio must be 0 (off) or > 1, got {ratio}")
        self.ratio = ratio or None
        self._lock = threading.Lock()
        self._accepted: dict[int, list[float]] = {}

    def reference(self, round_idx: int, body_norm: float) -> tuple[float, str]:
        """The norm updates of ``round_idx`` are compared with, and what it is."""
        with self._lock:
            now = self._accepted.get(round_idx, [])
            if len(now) >= MIN_REFERENCE:
                return statistics.median(now), f"median of {len(now)} accepted updates this round"
            before = [r for r in self._accepted if r < round_idx]
            if before:
                last = self._accepted[max(before)]
                return statistics.median(
                    last
                ), f"median of {len(last)} accepted updates of round {max(before)}"
        return body_norm, "the body's norm"

    def check(self, worker_id: str, round_idx: int, norm: float, body_norm: float) -> None:
        """Refuse ``norm`` if over ``ratio`` x the reference.

        Raises:
            OutlierUpdateError: naming the norm, the reference and the ratio.
        """
        if self.ratio is None:
            return
        reference, what = self.reference(round_idx, body_norm)
        if reference > 0 and norm > self.ratio * reference:
            raise OutlierUpdateError(
                f"update of worker {worker_id} for round {round_idx} refused: its norm {norm:.4g} is "
                f"{norm / reference:.1f}x the reference {reference:.4g} ({what}), over "
                f"--max-update-norm-ratio {self.ratio:g}; it is not counted"
            )

    def accept(self, round_idx: int, norm: float) -> None:
        """Record an accepted update's norm (rounds before the previous one are forgotten)."""
        with self._lock:
            self._accepted.setdefault(round_idx, []).append(norm)
            for r in [r for r in self._accepted if r < round_idx - 1]:
                del self._accepted[r]
