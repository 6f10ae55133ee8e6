"""Build, start and drive dept-server: gRPC, the round ticker, metrics, graceful stop."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import grpc

from dept_comm.channel import bind, build_server
from dept_comm.service import add_parameter_server

from .app import ServerApp
from .auth import TokenInterceptor
from .config import ServerConfig
from .metrics_http import serve_metrics, summary_table
from .servicer import ParameterServerServicer

logger = logging.getLogger(__name__)


@dataclass
class RunningServer:
    """A started server: its app, gRPC server, bound ports and the ticker."""

    app: ServerApp
    grpc_server: grpc.Server
    port: int
    metrics_server: ThreadingHTTPServer | None
    metrics_port: int | None
    stop_event: threading.Event

    def stop(self, grace_s: float | None = None) -> None:
        self.stop_event.set()
        self.grpc_server.stop(grace_s).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.app.close()


def start_server(config: ServerConfig) -> RunningServer:
    """Create the app, bind the port (fails clearly if taken) and start serving."""
    app = ServerApp(config)
    interceptors = [TokenInterceptor(config.token)] if config.token else []
    server = build_server(config.max_workers_threads, interceptors=interceptors)
    add_parameter_server(ParameterServerServicer(app), server)
    try:
        port = bind(server, config.host, config.port)
    except Exception:
        app.close()
        raise
    server.start()
    metrics_server, metrics_port = None, None
    if config.metrics_port is not None:
        metrics_server, metrics_port = serve_metrics(config.host, config.metrics_port, lambda: app.records)
    stop = threading.Event()

    def tick() -> None:  # closes rounds at their deadline even when no commit arrives
        while not stop.wait(0.5):
            app.maybe_close()

    threading.Thread(target=tick, name="round-ticker", daemon=True).start()
    logger.info(
        "serving port=%d variant=%s rounds=%d workers=%d", port, config.variant, config.rounds, config.workers
    )
    return RunningServer(app, server, port, metrics_server, metrics_port, stop)


def run(config: ServerConfig, stop_requested: threading.Event, *, final_eval_wait_s: float = 60.0) -> int:
    """Serve until the last round closed (or a stop is requested); print the summary."""
    running = start_server(config)
    print(
        json.dumps({"event": "listening", "port": running.port, "metrics_port": running.metrics_port}),
        flush=True,
    )
    app = running.app
    while not (app.finished.is_set() or stop_requested.is_set()):
        app.finished.wait(0.2)
    if app.finished.is_set():
        # Workers pull the final body, evaluate it and report on Leave; give them a moment.
        app.wait_all_left(final_eval_wait_s)
        app.write_final()
        if running.metrics_server is not None and config.linger_s > 0:
            logger.info("run finished; serving final metrics for %.0f s", config.linger_s)
            stop_requested.wait(config.linger_s)
    running.stop(config.grace_s)
    print(summary_table(app.records), flush=True)
    return 0
