"""ParameterServer: the library's entry point, a DiLoCo-style parameter server over named tensors."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import TracebackType

import torch

from dept_comm.accounting import RoundMetrics

from .app import ServerApp
from .config import ServerConfig
from .hooks import ServerHooks
from .run import RunningServer, start_server

__all__ = ["ParameterServer"]

logger = logging.getLogger(__name__)


def _check_tensors(tensors: Mapping[str, torch.Tensor], hooks: ServerHooks) -> dict[str, torch.Tensor]:
    """fp32 contiguous copies of the caller's tensors, or a ValueError naming what is wrong."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("tensors must be a non-empty mapping of name -> torch.Tensor")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensors: every name must be a non-empty string, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        if not (t.is_floating_point() and torch.isfinite(t).all()):
            raise ValueError(f"tensors[{name!r}] must be a finite floating-point tensor")
        out[name] = t.detach().to("cpu", torch.float32).contiguous().clone()
    row = hooks.row_subset
    if row is not None and (row not in out or out[row].dim() != 2):
        raise ValueError(f"hooks.row_subset {row!r} must name a 2-D tensor of tensors")
    return out


class ParameterServer:
    """A parameter server for DiLoCo-style rounds over any named set of tensors.

    Workers join over gRPC (``dept_comm.service``), pull the global tensors, train, push their
    deltas (``θ_worker - θ_global``) and commit; when every expected worker committed (or at the
    deadline, with quorum) the server averages the deltas (in worker-id order, float32), runs the
    outer optimizer and publishes the next version. Usage::

        config = ServerConfig(port=0, rounds=10, workers=4, codec_up="int8", codec_down="int8")
        with ParameterServer(model.state_dict(), config) as server:
            print("serving on", server.port)
            server.wait()
            final = server.tensors()

    ``tensors`` are copied (fp32) at construction; the caller's are never read again. Invalid
    settings raise ``ValueError`` naming the field, here and not at ``start()``.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        config: ServerConfig,
        hooks: ServerHooks | None = None,
    ) -> None:
        if not isinstance(config, ServerConfig):
            raise ValueError(f"config must be a dept_comm.server.ServerConfig, got {type(config).__name__}")
        self._hooks = hooks if hooks is not None else ServerHooks()
        if not isinstance(self._hooks, ServerHooks):
            raise ValueError(f"hooks must be a ServerHooks, got {type(self._hooks).__name__}")
        self._tensors = _check_tensors(tensors, self._hooks)
        config.tls_pems()  # unreadable or non-PEM TLS files: refused now, not at start
        self._config = config
        self._running: RunningServer | None = None
        self._app: ServerApp | None = None  # the last started (kept after stop: records, tensors)
        self._lock = threading.Lock()
        self._final_written = False

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> int:
        """Bind the port and start serving; returns the bound port (``config.port`` 0: an
        ephemeral one).

        Raises:
            RuntimeError: already started.
            dept_comm.channel.BindError: the port cannot be bound.
            dept_comm.errors.DeptError: e.g. a ``resume`` the checkpoint does not match.
        """
        with self._lock:
            if self._running is not None:
                raise RuntimeError("ParameterServer already started")
            self._running = start_server(self._config, self._tensors, self._hooks, copy=True)
            self._app = self._running.app
            self._final_written = False
            return self._running.port

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the last round closed and every participant left (True), or ``timeout_s``
        passed (False). At the end of the run, the final evaluations participants reported on
        Leave are appended to ``config.metrics_path`` (once)."""
        running = self._require()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not running.app.finished.wait(timeout_s):
            return False
        left_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not running.app.wait_all_left(left_s):
            return False
        with self._lock:
            if not self._final_written:
                running.app.write_final()
                self._final_written = True
        return True

    def stop(self, save: bool = True, grace_s: float | None = None) -> None:
        """Stop serving: refuse new calls, give in-flight ones ``grace_s`` (default
        ``config.grace_s``), and with ``save`` and a ``checkpoint_dir`` checkpoint an unfinished
        run so that ``resume`` continues it. A no-op when not started (or already stopped)."""
        with self._lock:
            running, self._running = self._running, None
            if running is None:
                return
        grace = self._config.grace_s if grace_s is None else grace_s
        running.stop(grace, save_checkpoint=save)
        with self._lock:
            self._tensors = dict(running.app.model.shared)  # a later start() begins from here

    def __enter__(self) -> ParameterServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- state -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (after ``start()``)."""
        return self._require().port

    @property
    def records(self) -> list[RoundMetrics]:
        """One RoundMetrics per closed round (bytes each way, digests, workers), oldest first."""
        with self._lock:
            app = self._app
        return list(app.records) if app is not None else []

    @property
    def version(self) -> int:
        """The global tensors' version: the number of rounds applied."""
        with self._lock:
            app = self._app
        return app.model.version if app is not None else 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """A copy of the current global tensors (float32, by name)."""
        with self._lock:
            current = self._app.model.shared if self._app is not None else self._tensors
        return {k: v.clone() for k, v in current.items()}

    def _require(self) -> RunningServer:
        with self._lock:
            if self._running is None:
                raise RuntimeError("ParameterServer is not running; call start() first")
            return self._running
