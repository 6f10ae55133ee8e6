"""dept-server on the generic parameter server: build the app or a running server for a DEPT config."""

from __future__ import annotations

import threading

from dept_comm.server.app import ServerApp
from dept_comm.server.run import RunningServer, run, start_server

from .config import ServerConfig
from .hooks import dept_hooks
from .initial import InitialState, initial_shared_tensors

__all__ = ["build_app", "run_dept", "start_dept_server"]


def _initial(config: ServerConfig, initial: InitialState | None) -> InitialState:
    return initial if initial is not None else initial_shared_tensors(config)


def build_app(config: ServerConfig, initial: InitialState | None = None) -> ServerApp:
    """A ServerApp with DEPT's hooks. ``initial``: the starting tensors, vocabulary digest and run
    description (default: built from ``config.model``; the load benchmark passes a synthetic
    body); the app takes the tensors over (no copy)."""
    shared, vocab_digest, run_info = _initial(config, initial)
    return ServerApp(config, shared, dept_hooks(config, vocab_digest, run_info), copy=False)


def start_dept_server(config: ServerConfig, initial: InitialState | None = None) -> RunningServer:
    """Start serving a DEPT run (see ``dept_comm.server.run.start_server`` and ``build_app``)."""
    shared, vocab_digest, run_info = _initial(config, initial)
    return start_server(config, shared, dept_hooks(config, vocab_digest, run_info), copy=False)


def run_dept(
    config: ServerConfig, stop_requested: threading.Event, *, final_eval_wait_s: float = 60.0
) -> int:
    """dept-server's run: serve until the last round closed (or a stop is requested)."""
    # Nothing here keeps the initial tensors: the app holds the only reference (one body, not two).
    return run(start_dept_server(config), stop_requested, final_eval_wait_s=final_eval_wait_s)
