"""Build, start and drive a parameter server: gRPC, health, the round ticker, metrics, graceful stop."""

from __future__ import annotations

import gc
import json
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import grpc
import torch
from grpc_health.v1 import health, health_pb2

from dept_comm.channel import bind, build_server, server_options
from dept_comm.grpc_env import transport
from dept_comm.memory import keep_freed_memory, release_freed_memory
from dept_comm.service import SERVICE_NAME, add_parameter_server
from dept_comm.staging import STAGING_KEEP_S
from dept_comm.tls import server_credentials

from .app import ServerApp
from .auth import TokenInterceptor
from .config import ServerConfig
from .hooks import ServerHooks
from .metrics_http import serve_metrics, summary_table
from .servicer import ParameterServerServicer

logger = logging.getLogger(__name__)

OVERALL = ""  # the health service's name for the server as a whole
HEALTH_THREADS = 2
TRIM_THRESHOLD_BYTES = 64 << 20
# Blocks of 1 MiB and more are mapped on their own, gRPC's copy of every 1 MiB chunk message among
# them: a pull from a trimmed heap (a round's first pulls) maps and faults in each message afresh
# (~131,500 faults per 256 MiB pull; 553-733 MB/s on loopback against 1.5-1.8 GB/s from a warm
# heap). A threshold just above a message (1 MiB + 64 KiB), or down-link chunks of 960 KiB, ends
# that, but each raised `dept-bench load --runs 64x64`'s peak (0.1-0.2x body above 1 MiB in each
# interleaved pair) and each passed 4x body once (4.15, 4.28), where this setting stayed at
# 3.36-3.93 in eight runs: kept at 1 MiB (docs/SCALE.md).
MMAP_THRESHOLD_BYTES = 1 << 20
MALLOC_ARENAS = 2
TRIM_EVERY_TICKS = (
    4  # 2 s  # health calls run here, never queued behind streams and long polls on the RPC pool
)


@dataclass
class RunningServer:
    """A started server: its app, gRPC server, health servicer, bound ports and the ticker."""

    app: ServerApp
    grpc_server: grpc.Server
    port: int
    metrics_server: ThreadingHTTPServer | None
    metrics_port: int | None
    stop_event: threading.Event
    health: health.HealthServicer
    ticker: threading.Thread

    def stop(self, grace_s: float | None = None, *, save_checkpoint: bool = False) -> None:
        """Stop gracefully: NOT_SERVING at once, refuse new RPCs, give in-flight ones ``grace_s``.

        Then the ticker is joined (no round closes any more) and, with ``save_checkpoint`` and a
        checkpoint dir, the state of an unfinished run is saved before the app releases its store.
        """
        self.health.enter_graceful_shutdown()
        self.stop_event.set()
        self.app.watchers.close()  # open WatchRounds streams end now instead of holding the grace
        self.grpc_server.stop(grace_s).wait()
        self.ticker.join()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if save_checkpoint and not self.app.finished.is_set():
            save_final_checkpoint(self.app)
        self.app.close()


def save_final_checkpoint(app: ServerApp) -> None:
    """Checkpoint the current body and the open round's index, so ``--resume`` continues from here.

    Round closes and abandons already checkpoint; this covers a run stopped before either (and
    rewrites the current step otherwise, which is harmless: saves are atomic). Call it only once
    no RPC or ticker can close a round any more.
    """
    if app.config.checkpoint_dir is None:
        return
    app.save_checkpoint()
    logger.info(
        "final_checkpoint round=%d version=%d", app.coordinator.current_round().round_idx, app.model.version
    )


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    pems = config.tls_pems()
    if pems is None:
        return None
    cert, key, client_ca = pems
    return server_credentials(cert, key, client_ca)


def _add_health(server: grpc.Server) -> health.HealthServicer:
    """Register grpc.health.v1.Health with its own small thread pool for Check and Watch.

    gRPC runs every handler on the server's RPC pool unless the handler function carries an
    ``experimental_thread_pool``; grpcio-health-checking sets one on Watch only (and on the class,
    shared by every servicer in the process), so a pool full of streams and long polls would
    starve Check. Per-server wrappers carry this server's pool for both methods; Watch is also
    non-blocking (it holds no thread between updates). List is not served (UNIMPLEMENTED).
    """
    pool = futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="dept-health")
    servicer = health.HealthServicer(experimental_non_blocking=True, experimental_thread_pool=pool)

    def check(
        request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return servicer.Check(request, context)

    def watch(
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[health_pb2.HealthCheckResponse | None], None] | None = None,
    ) -> health_pb2.HealthCheckResponse:
        return servicer.Watch(request, context, send_response_callback)

    for behavior in (check, watch):
        setattr(behavior, "experimental_thread_pool", pool)  # noqa: B010 (functions have no such field)
    setattr(watch, "experimental_non_blocking", True)  # noqa: B010
    codec = {
        "request_deserializer": health_pb2.HealthCheckRequest.FromString,
        "response_serializer": health_pb2.HealthCheckResponse.SerializeToString,
    }
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(check, **codec),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, **codec),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(health.SERVICE_NAME, handlers),))
    return servicer


def tune_malloc() -> None:
    """The server's allocator settings (glibc): blocks of 1 MiB and more (decoded tensors, chunk
    payloads, staging buffers) are mapped and unmapped on their own, smaller ones come from at
    most 2 arenas that keep at most 64 MiB free at their top; the round ticker also trims every
    few seconds. Measured with ``dept-bench load`` (32 workers x 64 MiB body, docs/SCALE.md):
    with a 32 MiB mmap threshold, freed tensors of concurrent commits left holes that kept the
    peak ~300 MiB higher (and the idle server 64 MiB); the workers' default (every thread its own
    arena, 1 GiB kept) left the peak 2.7 GB above idle."""
    keep_freed_memory(
        mmap_threshold_bytes=MMAP_THRESHOLD_BYTES,
        trim_threshold_bytes=TRIM_THRESHOLD_BYTES,
        max_arenas=MALLOC_ARENAS,
        top_pad_bytes=None,  # glibc's own: the server's arenas keep at most the trim threshold
    )


def stream_options(config: ServerConfig) -> list[tuple[str, int]]:
    """``server_options`` plus a fixed HTTP/2 receive window per stream.

    gRPC grows each stream's window by BDP probing; on loopback with 32 concurrent pushes that
    let ~9 MiB per upload wait unread in gRPC's buffers (measured with ``dept-bench load``,
    docs/SCALE.md). A fixed ``--stream-window-kib`` caps it; one upload's rate is then at most
    the window per round trip.
    """
    fixed = ("grpc.http2.bdp_probe", "grpc.http2.lookahead_bytes")
    return [
        # Each key once: with a duplicate, which value gRPC takes is not ours to rely on.
        *(opt for opt in server_options() if opt[0] not in fixed),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", config.stream_window_kib << 10),
    ]


def start_server(
    config: ServerConfig,
    tensors: Mapping[str, torch.Tensor],
    hooks: ServerHooks | None = None,
    *,
    copy: bool = True,
) -> RunningServer:
    """Create the app over ``tensors`` (see ServerApp), bind the port (fails clearly if taken)
    and start serving.

    Raises:
        ValueError: unreadable TLS files.
        BindError: the port cannot be bound.
    """
    credentials = _credentials(config)
    app = ServerApp(config, tensors, hooks, copy=copy)
    release_freed_memory()  # what building the model freed (its own copy of every tensor) goes back
    tokens = [config.token] if config.token else app.join_policy.bearer_tokens
    interceptors = [TokenInterceptor(tokens)] if tokens else []
    server = build_server(config.rpc_threads, interceptors=interceptors, options=stream_options(config))
    add_parameter_server(ParameterServerServicer(app), server)
    health_servicer = _add_health(server)
    try:
        port = bind(server, config.host, config.port, credentials)
    except Exception:
        app.close()
        raise
    server.start()
    for service in (OVERALL, SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    metrics_server, metrics_port = None, None
    if config.metrics_port is not None:
        metrics_server, metrics_port = serve_metrics(
            config.host, config.metrics_port, lambda: app.records, app.inflight.prometheus_text
        )
    stop = threading.Event()

    def tick() -> None:  # closes rounds at their deadline even when no commit arrives
        ticks = 0
        while not stop.wait(0.5):
            app.maybe_close()
            ticks += 1
            if ticks % TRIM_EVERY_TICKS == 0:
                app.staging.trim(STAGING_KEEP_S)  # staging buffers no upload reused for a while
                release_freed_memory()  # freed chunk and staging buffers go back to the system

    ticker = threading.Thread(target=tick, name="round-ticker", daemon=True)
    ticker.start()
    logger.info(
        "serving port=%d tls=%s mtls=%s variant=%s rounds=%d workers=%d max_workers=%d max_streams=%d "
        "rpc_threads=%d heartbeat_timeout_s=%.1f",
        port,
        config.tls,
        config.tls_client_ca is not None,
        app.hooks.label,
        config.rounds,
        config.workers,
        config.max_workers,
        config.max_streams,
        config.rpc_threads,
        config.heartbeat_timeout_s,
    )
    logger.info(transport().describe())
    return RunningServer(app, server, port, metrics_server, metrics_port, stop, health_servicer, ticker)


def freeze_startup_heap() -> None:
    """Collect, then leave everything built so far (the model, torch, gRPC, the modules) out of
    the cyclic garbage collector's scans (``gc.freeze``): the objects each message of a stream
    allocates trigger collections, and the oldest generation's scans then walk only what the run
    made since. Measured with ``dept_comm.server`` behind ``dept-bench wire``'s server, two servers
    side by side, both launch orders: push best 2230 against 1984 and 2105 against 2045 MB/s,
    medians 1861 against 1720 and 1867 against 1717 (frozen first). For a server process's CLI,
    once, after start-up; objects frozen stay until exit, so never from library code that may
    run many servers in one process."""
    gc.collect()
    gc.freeze()


def run(running: RunningServer, stop_requested: threading.Event, *, final_eval_wait_s: float = 60.0) -> int:
    """Serve a started server until the last round closed (or a stop is requested); print the
    listening line first and the summary last. Start-up's objects leave the garbage collector's
    scans first (:func:`freeze_startup_heap`): ``run`` is the CLIs' loop.

    A stop request (SIGTERM/SIGINT in the CLI) stops gracefully and checkpoints an unfinished run.
    The caller should hold no reference to the initial tensors (the first round replaces them).
    """
    freeze_startup_heap()
    config = running.app.config
    print(
        json.dumps({"event": "listening", "port": running.port, "metrics_port": running.metrics_port}),
        flush=True,
    )
    app = running.app
    while not (app.finished.is_set() or stop_requested.is_set()):
        app.finished.wait(0.2)
    if app.finished.is_set():
        # Workers pull the final body, evaluate it and report on Leave; give them a moment.
        app.wait_all_left(final_eval_wait_s, stop=stop_requested)  # SIGTERM cuts the wait short
        app.write_final()
        if running.metrics_server is not None and config.linger_s > 0:
            logger.info("run finished; serving final metrics for %.0f s", config.linger_s)
            stop_requested.wait(config.linger_s)
    else:
        logger.info("stop requested; draining in-flight RPCs for up to %.1f s", config.grace_s)
    running.stop(config.grace_s, save_checkpoint=True)
    print(summary_table(app.records), flush=True)
    return 0
