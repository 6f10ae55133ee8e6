"""WatchRounds without a thread per watcher: one notifier thread sends every open stream its events.

gRPC's sync server can run a server-streaming handler *non-blocking*: the handler gets a
``send_response_callback`` and returns at once, and whatever calls the callback later sends on
the stream (``None`` ends it with OK). Each watcher is one such stream; it holds no pool thread
while it waits. When a round opens or the run finishes, :meth:`RoundWatchers.publish` wakes the
notifier, which sends each watcher the new round as that worker sees it (``committed``,
``admitted_round``). A new stream's first event, the round open now, comes the same way.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from dept_comm.errors import OverloadedError
from dept_comm.pb import service_pb2

logger = logging.getLogger(__name__)
Send = Callable[[service_pb2.RoundEvent | None], None]
OPENED = service_pb2.RoundEvent.KIND_OPENED
FINISHED_EVENT = service_pb2.RoundEvent.KIND_FINISHED


@dataclass
class _Watcher:
    worker_id: str
    send: Send
    last_round: int


def event_for(info: service_pb2.RoundInfo) -> service_pb2.RoundEvent:
    finished = info.state == service_pb2.RUN_STATE_FINISHED
    return service_pb2.RoundEvent(kind=FINISHED_EVENT if finished else OPENED, round=info)


class RoundWatchers:
    """The open WatchRounds streams, at most ``limit`` of them."""

    def __init__(self, round_info: Callable[[str], service_pb2.RoundInfo], limit: int) -> None:
        self._round_info = round_info
        self.limit = limit
        self._lock = threading.Lock()
        self._watchers: dict[int, _Watcher] = {}
        self._keys = itertools.count()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="round-watchers", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._watchers)

    def add(self, worker_id: str, send: Send) -> int:
        """Register a stream; the notifier sends it the current round at once (it alone sends, so
        events arrive in order). Returns the key for :meth:`remove`.

        Raises:
            OverloadedError: ``limit`` streams are open already.
        """
        with self._lock:
            if self._closed:
                raise OverloadedError("the server is stopping", retry_after_s=5.0)
            if len(self._watchers) >= self.limit:
                raise OverloadedError(f"{self.limit} round watchers open already", retry_after_s=5.0)
            key = next(self._keys)
            self._watchers[key] = _Watcher(worker_id, send, last_round=-1)
        self._wake.set()
        return key

    def remove(self, key: int) -> None:
        with self._lock:
            self._watchers.pop(key, None)

    def publish(self) -> None:
        """A round opened or the run finished: the notifier sends the news (this call does not block)."""
        self._wake.set()

    def close(self) -> None:
        """End every stream (OK) and stop the notifier."""
        with self._lock:
            self._closed = True
            keys = list(self._watchers)
        for key in keys:
            self._end(key)
        self._wake.set()
        self._thread.join(timeout=5)

    def _send(self, key: int, event: service_pb2.RoundEvent | None) -> None:
        with self._lock:
            watcher = self._watchers.get(key)
        if watcher is None:
            return
        try:
            watcher.send(event)
        except Exception as err:  # a stream that went away: forget it, never fail the others
            logger.debug("round watcher %d dropped: %s", key, err)
            self.remove(key)

    def _end(self, key: int) -> None:
        self._send(key, None)
        self.remove(key)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                if self._closed:
                    return
                watchers = list(self._watchers.items())
            for key, w in watchers:
                try:
                    info = self._round_info(w.worker_id)
                except Exception:  # never let one watcher stop the notifier
                    logger.exception("round info for watcher %s failed", w.worker_id)
                    continue
                if int(info.round_idx) == w.last_round and info.state != service_pb2.RUN_STATE_FINISHED:
                    continue
                w.last_round = int(info.round_idx)
                self._send(key, event_for(info))
                if info.state == service_pb2.RUN_STATE_FINISHED:
                    self._end(key)
