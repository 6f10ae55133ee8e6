"""Progress a user can watch: periodic log lines for long transfers and loops, and in-flight gauges.

:class:`TransferProgress` counts the bytes of a pull or push as its messages move and, once every
``interval_s``, logs one line::

    transfer_progress direction=pull done=12582912 total=unknown rate_MBps=1.20 eta_s=unknown tensors=3/40

``total`` is known for a push (the messages are all built before they are sent) and for a pull
whose open announces ``payload_bytes`` (dept-server's do); otherwise it is unknown and there is no
ETA. ``tensors`` (the highest tensor begun, of the open's count) says how far it went either way. A transfer that ends within
``interval_s`` logs nothing. The rate is the average since the transfer began.

:class:`IntervalGate` is the clock behind it, for any loop (the worker's inner steps use it).

:class:`InflightTransfers` counts the bytes and streams moving now, per direction, for a server's
Prometheus endpoint: a stream adds its messages' bytes as they pass and takes them all back when
it ends, however it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TypeVar

from dept_comm.frames import WireItem, chunk_of, kind_of
from dept_comm.pb import tensor_pb2 as pb

__all__ = ["DIRECTIONS", "InflightTransfers", "IntervalGate", "TransferProgress", "size_of"]

logger = logging.getLogger(__name__)
DIRECTIONS = ("pull", "push")
DEFAULT_INTERVAL_S = 10.0


M = TypeVar("M", bound=WireItem)


def size_of(msg: WireItem) -> int:
    """Bytes of one stream message as sent (its serialized size)."""
    return int(msg.ByteSize())


class IntervalGate:
    """True once every ``interval_s`` (by ``clock``), counted from construction; never before."""

    def __init__(
        self, interval_s: float = DEFAULT_INTERVAL_S, *, clock: Callable[[], float] = time.monotonic
    ):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self.started = clock()
        self._next = self.started + interval_s

    def due(self) -> bool:
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True

    def elapsed(self) -> float:
        return self._clock() - self.started


def _tensor_position(msg: WireItem) -> tuple[int | None, int | None, int | None]:
    """(tensor count and announced payload bytes from an open, tensor index from a chunk), each
    None where the message has none."""
    chunk = chunk_of(msg)
    if chunk is not None:
        return None, None, int(chunk.tensor_idx)
    if kind_of(msg) == "open" and isinstance(msg, pb.StreamMessage):
        return int(msg.open.num_tensors), int(msg.open.payload_bytes) or None, None
    return None, None, None


class TransferProgress:
    """Counts one transfer's bytes and logs its progress once every ``interval_s``."""

    def __init__(
        self,
        direction: str,
        *,
        total_bytes: int | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = logger,
    ) -> None:
        self.direction = direction
        self.total_bytes = total_bytes
        self.done = 0
        self.num_tensors: int | None = None
        self.tensor_idx: int | None = None
        self.lines = 0
        self._gate = IntervalGate(interval_s, clock=clock)
        self._log = log

    def wrap(self, messages: Iterable[M]) -> Iterator[M]:
        """Yield ``messages`` unchanged, counting each one after it moved."""
        for msg in messages:
            self.add(msg)
            yield msg

    def add(self, msg: WireItem) -> None:
        """Count one message (its bytes, and where in the stream's tensors it is)."""
        self.done += size_of(msg)
        count, announced, idx = _tensor_position(msg)
        if count is not None:
            self.num_tensors = count
        if announced is not None and self.total_bytes is None:
            self.total_bytes = announced  # the chunks' payload; framing makes ``done`` end a little above
        if idx is not None:
            self.tensor_idx = idx if self.tensor_idx is None else max(self.tensor_idx, idx)
        if self._gate.due():
            self._report()

    def rate_bps(self) -> float:
        """Average bytes per second since the transfer began (0 before any time passed)."""
        elapsed = self._gate.elapsed()
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the average rate; None with no total or no rate yet."""
        rate = self.rate_bps()
        if self.total_bytes is None or rate <= 0:
            return None
        return max(self.total_bytes - self.done, 0) / rate

    def _report(self) -> None:
        self.lines += 1
        eta = self.eta_s()
        tensors = (
            f" tensors={(self.tensor_idx or 0) + 1}/{self.num_tensors}"
            if self.num_tensors is not None and self.tensor_idx is not None
            else ""
        )
        self._log.info(
            "transfer_progress direction=%s done=%d total=%s rate_MBps=%.2f eta_s=%s%s",
            self.direction,
            self.done,
            self.total_bytes if self.total_bytes is not None else "unknown",
            self.rate_bps() / 1e6,
            f"{eta:.0f}" if eta is not None else "unknown",
            tensors,
        )


class InflightTransfers:
    """Bytes and streams moving now, per direction (thread-safe; for a Prometheus endpoint)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = dict.fromkeys(DIRECTIONS, 0)
        self._streams = dict.fromkeys(DIRECTIONS, 0)

    def track(self, direction: str, messages: Iterable[M]) -> Generator[M, None, None]:
        """Yield ``messages``, adding each one's bytes as it passes; all of them leave at the end."""
        if direction not in self._bytes:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        moved = 0
        with self._lock:
            self._streams[direction] += 1
        try:
            for msg in messages:
                n = size_of(msg)
                moved += n
                with self._lock:
                    self._bytes[direction] += n
                yield msg
        finally:
            with self._lock:
                self._bytes[direction] -= moved
                self._streams[direction] -= 1

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """direction -> (bytes moved so far by the open streams, open streams)."""
        with self._lock:
            return {d: (self._bytes[d], self._streams[d]) for d in DIRECTIONS}

    def prometheus_text(self) -> str:
        """``dept_inflight_{pull,push}_bytes`` and ``dept_inflight_streams{direction=...}``."""
        snap = self.snapshot()
        lines: list[str] = []
        for d in DIRECTIONS:
            name = f"dept_inflight_{d}_bytes"
            lines += [
                f"# HELP {name} Bytes the {d} streams open now have moved so far.",
                f"# TYPE {name} gauge",
                f"{name} {snap[d][0]}",
            ]
        lines += [
            "# HELP dept_inflight_streams Pull and push streams open now.",
            "# TYPE dept_inflight_streams gauge",
            *(f'dept_inflight_streams{{direction="{d}"}} {snap[d][1]}' for d in DIRECTIONS),
        ]
        return "\n".join(lines) + "\n"
