"""A userspace link emulator: a TCP relay with a rate cap, one-way delay, jitter, resets, blackholes.

``LinkEmulator(target)`` listens on ``127.0.0.1:0`` and relays every accepted connection to
``target``. Each direction is one emulated link shared by every connection (as one access link
is): a chunk read from the sender is serialised onto the link at ``rate_bps`` (behind whatever is
already queued), then delivered ``delay_s`` (plus up to ``jitter_s``, uniform, never reordering
the bytes of a connection) later. The relay reads a sender only while fewer than ``queue_bytes``
are in flight on that link, so TCP backpressure reaches the sender as at a real bottleneck; the
default holds one bandwidth-delay product plus 256 KiB.

Faults: ``reset_after_bytes`` cuts every connection with an RST once that many bytes (both
directions together) have been relayed, once (exactly that many get through); ``blackhole()`` stops delivering (sockets stay
open, nothing moves) until ``blackhole(False)``; ``reset_all()`` cuts every connection now.

Used by tests (behaviour: bytes intact, resets cut, blackholes stall) and by ``dept-bench link``.
Where a Linux kernel emulator is available, ``netns.py`` builds the real thing (veth + tbf).
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

READ_BYTES = 64 << 10


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """One emulated link, the same both ways. ``rate_bps`` 0 means no cap."""

    rate_bps: float = 0.0
    delay_s: float = 0.0  # one way
    jitter_s: float = 0.0
    queue_bytes: int = 0  # 0: one bandwidth-delay product (rate x 2 x delay) plus 256 KiB
    reset_after_bytes: int = 0  # 0: never
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate_bps < 0 or self.delay_s < 0 or self.jitter_s < 0 or self.reset_after_bytes < 0:
            raise ValueError(f"link parameters must be >= 0: {self}")

    @property
    def queue_limit(self) -> int:
        if self.queue_bytes:
            return self.queue_bytes
        bdp = int(self.rate_bps / 8 * 2 * (self.delay_s + self.jitter_s)) if self.rate_bps else 16 << 20
        return bdp + (256 << 10)


class _Direction:
    """One way of the link: a serialisation clock shared by every connection, and the queue bound."""

    def __init__(self, spec: LinkSpec, rng: random.Random) -> None:
        self.spec = spec
        self._rng = rng
        self._free_at = 0.0  # when the link finishes serialising what is queued
        self._in_flight = 0
        self.cond = threading.Condition()

    def admit(self, n: int, stop: threading.Event) -> float | None:
        """Wait for queue room for ``n`` bytes; return their delivery time (None once stopped)."""
        with self.cond:
            while self._in_flight and self._in_flight + n > self.spec.queue_limit and not stop.is_set():
                self.cond.wait(0.05)
            if stop.is_set():
                return None
            self._in_flight += n
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + (n * 8 / self.spec.rate_bps if self.spec.rate_bps else 0.0)
            jitter = self._rng.uniform(0, self.spec.jitter_s) if self.spec.jitter_s else 0.0
            return self._free_at + self.spec.delay_s + jitter

    def delivered(self, n: int) -> None:
        with self.cond:
            self._in_flight -= n
            self.cond.notify_all()


class LinkEmulator:
    """Relay ``127.0.0.1:<port>`` to ``target`` through an emulated link."""

    def __init__(
        self, target: tuple[str, int], spec: LinkSpec | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.target = target
        self.spec = spec or LinkSpec()
        rng = random.Random(self.spec.seed)
        self._dirs = {"up": _Direction(self.spec, rng), "down": _Direction(self.spec, rng)}
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self.host = host
        self._stop = threading.Event()
        self._open = threading.Event()  # set: deliver; clear: blackholed
        self._open.set()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._relayed = 0
        self._reset_armed = self.spec.reset_after_bytes > 0
        self.resets = 0
        self.bytes = {"up": 0, "down": 0}
        self._accepter = threading.Thread(target=self._accept_loop, name="linkemu-accept", daemon=True)
        self._accepter.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- faults ------------------------------------------------------------------------------

    def blackhole(self, on: bool = True) -> None:
        """Stop (or resume) delivering in both directions; connections stay open."""
        if on:
            self._open.clear()
        else:
            self._open.set()

    def reset_all(self) -> None:
        """Cut every open connection with an RST."""
        with self._lock:
            conns, self._conns = self._conns, []
            self.resets += 1
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # SHUT_RD wakes a relay thread blocked in recv (sends nothing); until that thread lets
            # go of the socket, close() alone would not send the RST.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RD)
            with contextlib.suppress(OSError):
                s.close()

    # -- relay -------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
            for src, dst, way in ((client, upstream, "up"), (upstream, client, "down")):
                self._start_direction(src, dst, way)

    def _start_direction(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        link = self._dirs[way]
        queue: collections.deque[tuple[float, bytes] | None] = collections.deque()
        ready = threading.Condition()

        def reader() -> None:
            try:
                while not self._stop.is_set():
                    data = src.recv(READ_BYTES)
                    if not data:
                        break
                    due = link.admit(len(data), self._stop)
                    if due is None:
                        break
                    with ready:
                        queue.append((due, data))
                        ready.notify()
            except OSError:
                pass
            with ready:
                queue.append(None)
                ready.notify()

        def writer() -> None:
            try:
                while True:
                    with ready:
                        while not queue:
                            ready.wait()
                        item = queue.popleft()
                    if item is None:
                        break
                    due, data = item
                    while (wait := due - time.monotonic()) > 0 and not self._stop.is_set():
                        time.sleep(min(wait, 0.05))
                    while not self._open.is_set() and not self._stop.is_set():
                        self._open.wait(0.05)
                    if self._stop.is_set():
                        break
                    n, cut = self._take(way, len(data))
                    dst.sendall(data[:n])
                    link.delivered(len(data))
                    if cut:
                        self.reset_all()
                        break
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=reader, name=f"linkemu-{way}-read", daemon=True).start()
        threading.Thread(target=writer, name=f"linkemu-{way}-write", daemon=True).start()

    def _take(self, way: str, n: int) -> tuple[int, bool]:
        """How many of ``n`` bytes go through before an armed reset, and whether to cut after them."""
        with self._lock:
            if self._reset_armed and self._relayed + n >= self.spec.reset_after_bytes:
                self._reset_armed = False
                n = self.spec.reset_after_bytes - self._relayed
                cut = True
            else:
                cut = False
            self.bytes[way] += n
            self._relayed += n
            return n, cut

    def close(self) -> None:
        self._stop.set()
        self._open.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset_all()
        self._accepter.join(timeout=2)

    def __enter__(self) -> LinkEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
