"""A small threaded TCP proxy for tests: counts bytes per direction and injects faults.

It listens on 127.0.0.1:0 and forwards every accepted connection to ``target``. Counters are
per direction (``up`` = client to server). Faults: ``blackhole()`` stops forwarding while
keeping sockets open; ``reset_all()`` closes every connection with an RST.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class ByteCount:
    up: int = 0
    down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, direction: str, n: int) -> None:
        with self.lock:
            if direction == "up":
                self.up += n
            else:
                self.down += n


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target`` and count the bytes each way."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.counts = ByteCount()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._blackhole = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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
            with self._lock:
                self._conns += [client, upstream]
            for src, dst, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                while self._blackhole.is_set() and not self._stop.is_set():
                    self._stop.wait(0.05)
                self.counts.add(direction, n)
                dst.sendall(view[:n])
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def blackhole(self, on: bool = True) -> None:
        if on:
            self._blackhole.set()
        else:
            self._blackhole.clear()

    def reset_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self.reset_all()
        self._accepter.join(timeout=2)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
