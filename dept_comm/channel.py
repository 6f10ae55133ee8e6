"""gRPC plumbing: server and channel options, binding, status mapping both ways, bounded retries."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Sequence
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc

from dept_comm import errors
from dept_comm.errors import DeptError
from dept_comm.stall import StalledStreamError

__all__ = [
    "MAX_CHUNK_BYTES",
    "STATUS_FOR",
    "BindError",
    "abort_with",
    "bind",
    "build_server",
    "call_with_retry",
    "channel_options",
    "chunk_timeout_s",
    "error_from_rpc",
    "open_channel",
    "retry_after_hint",
    "server_options",
    "status_for",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CHUNK_BYTES = 2 << 20
MESSAGE_HEADROOM_BYTES = 64 << 10  # header, framing and field tags around a full chunk
KEEPALIVE_TIME_MS = 30_000  # client pings this often when idle ...
KEEPALIVE_TIMEOUT_MS = 10_000  # ... and drops the link when a ping is unanswered this long
MIN_PING_INTERVAL_MS = 20_000  # server tolerates pings this close; must stay <= KEEPALIVE_TIME_MS
ERROR_METADATA_KEY = "dept-error"  # trailing metadata naming the DeptError class
RETRY_AFTER_METADATA_KEY = "dept-retry-after-ms"  # trailing metadata: an overloaded server's retry hint
GRPC_OVERLOAD_DETAILS = "Concurrent RPC limit exceeded!"  # grpcio's own refusal past maximum_concurrent_rpcs
TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"  # channel option: the name the server cert must match

STATUS_FOR: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


class BindError(OSError):
    """The server could not listen on the requested address (usually: the port is taken)."""


MAX_FRAME_BYTES = 1 << 20  # HTTP/2 SETTINGS_MAX_FRAME_SIZE each end announces (16 KiB by default)


def _shared_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """What both ends must agree on: message limits and keepalive; HTTP/2 windows that grow.

    ``grpc.http2.bdp_probe`` (gRPC's default, pinned here) lets each receiver grow its HTTP/2
    window to the link's bandwidth-delay product. Measured with ``dept-bench link`` (one stream,
    fp32 body, userspace emulator): 1 Gbit/s at 50 ms RTT moved 64 MiB in 0.59-0.65 s (ideal
    0.54 s) with it and 4.3-4.7 s without (64 KiB windows); 100 Mbit/s at 50 ms, 16 MiB: 1.40 s
    against 2.21 s (ideal 1.34 s). A fixed ``grpc.http2.lookahead_bytes`` of 16 MiB gained
    nothing over the probe, and one stream per transfer already fills these links.

    ``grpc.http2.max_frame_size`` (what each end lets its peer send in one HTTP/2 DATA frame) is
    1 MiB, a chunk, instead of HTTP/2's 16 KiB: a chunk crosses as one frame instead of 64, each
    parsed and accounted on its own. On loopback (``dept-bench wire``'s server, 256 MiB fp32, two
    servers side by side) its effect is within this host's noise once both launch orders are run
    (the second server launched is the faster one by up to ~12%; a first comparison, in one order
    only, had shown +13-16%). It costs nothing measurable either: ``dept-bench link`` and
    ``dept-bench load`` are unchanged. The receiver's flow-control window still bounds what is in
    flight, and on a slow link a 1 MiB frame takes no longer than the chunk it carries.
    """
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.bdp_probe", 1),
        ("grpc.http2.max_frame_size", MAX_FRAME_BYTES),
    ]


def server_options(
    max_message_bytes: int = MAX_CHUNK_BYTES + MESSAGE_HEADROOM_BYTES,
) -> list[tuple[str, int]]:
    """Server channel arguments: chunk-sized message limits, keepalive matching ``channel_options``.

    ``grpc.so_reuseport`` is 0 so that a second server on the same port fails instead of silently
    sharing it.
    """
    return [
        *_shared_options(max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", 15 * 60_000),
        ("grpc.so_reuseport", 0),
    ]


def channel_options(
    max_message_bytes: int = MAX_CHUNK_BYTES + MESSAGE_HEADROOM_BYTES,
) -> list[tuple[str, Any]]:
    """Client channel arguments agreeing with ``server_options`` (keepalive, limits, reconnects)."""
    return [
        *_shared_options(max_message_bytes),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 1_000),
        ("grpc.max_reconnect_backoff_ms", 20_000),
    ]


def build_server(
    max_workers: int,
    *,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    maximum_concurrent_rpcs: int | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.Server:
    """A sync gRPC server with ``server_options`` (each streaming RPC holds one pool thread).

    Raises:
        ValueError: ``max_workers`` < 1, or ``maximum_concurrent_rpcs`` not below ``max_workers``
            (excess calls must be refused with RESOURCE_EXHAUSTED, not queued behind busy threads).
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if maximum_concurrent_rpcs is not None and not 1 <= maximum_concurrent_rpcs <= max_workers:
        raise ValueError(
            f"maximum_concurrent_rpcs={maximum_concurrent_rpcs} must be in [1, max_workers={max_workers}]"
        )
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dept-rpc"),
        interceptors=list(interceptors),
        options=list(options) if options is not None else server_options(),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )


def open_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A channel to ``target`` with ``channel_options``: TLS when ``credentials`` is given, else plaintext.

    ``server_name`` replaces the host of ``target`` as the name the server certificate must carry
    (for a server reached by an address its certificate does not name).

    Raises:
        ValueError: ``server_name`` without ``credentials`` (it means nothing in plaintext).
    """
    opts = list(options) if options is not None else channel_options()
    if server_name is not None:
        if credentials is None:
            raise ValueError(
                "server_name is checked against the server's certificate: it needs TLS credentials"
            )
        opts.append((TARGET_NAME_OVERRIDE, server_name))
    if credentials is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, credentials, options=opts)


def bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on ``host:port`` (0 picks a free port) and return the bound port.

    With ``credentials`` (see ``dept_comm.tls.server_credentials``) the port speaks TLS only; without, plaintext.

    Raises:
        BindError: the address cannot be bound (port taken, bad host).
    """
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as err:  # grpcio >= 1.5x raises instead of returning 0
        raise BindError(f"cannot bind gRPC server to {address}: {err} (port in use?)") from err
    if bound == 0:
        raise BindError(f"cannot bind gRPC server to {address} (port in use?)")
    return bound


def status_for(err: DeptError) -> grpc.StatusCode:
    """The status a servicer answers ``err`` with (INTERNAL for an unknown status name)."""
    return STATUS_FOR.get(err.status, grpc.StatusCode.INTERNAL)


def abort_with(context: grpc.ServicerContext, err: DeptError) -> NoReturn:
    """End the RPC with ``err``'s status; details start with the class name for ``error_from_rpc``."""
    metadata: list[tuple[str, str]] = [(ERROR_METADATA_KEY, type(err).__name__)]
    if isinstance(err, errors.OverloadedError):
        metadata.append((RETRY_AFTER_METADATA_KEY, str(max(1, round(err.retry_after_s * 1000)))))
    context.set_trailing_metadata(tuple(metadata))
    context.abort(status_for(err), f"{type(err).__name__}: {err}")


def _error_classes() -> dict[str, type[DeptError]]:
    out: dict[str, type[DeptError]] = {}
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, DeptError):
            out[value.__name__] = value
    return out


_ERROR_CLASSES = _error_classes()
# Codes gRPC itself never produces (statuscodes.md), so they carry only application meaning.
_APP_ONLY_CODES: dict[grpc.StatusCode, type[DeptError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInputError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.RoundNotOpenError,
    grpc.StatusCode.ABORTED: errors.StaleRoundError,
    grpc.StatusCode.DATA_LOSS: errors.ChecksumError,
}


def error_from_rpc(e: grpc.RpcError) -> DeptError | None:
    """The DeptError a failed call stands for, or None for transport failures (UNAVAILABLE etc.).

    The class named by the server (trailing metadata or details prefix) wins; otherwise only codes
    gRPC never generates itself are mapped, to the base class for that code.
    """
    code = e.code() if isinstance(e, grpc.Call) else None
    details = (e.details() if isinstance(e, grpc.Call) else None) or ""
    name = ""
    if isinstance(e, grpc.Call):
        for key, value in e.trailing_metadata() or ():
            if key == ERROR_METADATA_KEY:
                name = value if isinstance(value, str) else value.decode()
    if not name and ":" in details:
        name = details.split(":", 1)[0]
    cls = _ERROR_CLASSES.get(name)
    if cls is not None and code is not None and STATUS_FOR.get(cls.status) == code:
        message = details[len(name) + 2 :] if details.startswith(name + ": ") else details
        if cls is errors.OverloadedError:
            return errors.OverloadedError(message, retry_after_hint(e) or 1.0)
        return cls(message)
    if code is not None and code in _APP_ONLY_CODES:
        return _APP_ONLY_CODES[code](details)
    return None


SESSION_METADATA_KEY = "dept-session"  # the session credential Join issued; every later call carries it
_RETRY_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
OVERLOAD_DEFAULT_S = 1.0  # the wait when grpcio itself refused the call (it sends no hint)


def retry_after_hint(e: grpc.RpcError) -> float | None:
    """The seconds an overloaded server asked us to wait, or None when the error is no overload.

    An overload is RESOURCE_EXHAUSTED with the server's ``dept-retry-after-ms`` hint, or grpcio's
    own refusal past ``maximum_concurrent_rpcs`` (``OVERLOAD_DEFAULT_S``). Other RESOURCE_EXHAUSTED
    errors (a message over the size limit, a full membership) are not retried.
    """
    if not isinstance(e, grpc.Call) or e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in e.trailing_metadata() or ():
        if key == RETRY_AFTER_METADATA_KEY:
            try:
                return max(0.001, int(value if isinstance(value, str) else value.decode()) / 1000)
            except ValueError:
                return OVERLOAD_DEFAULT_S
    return OVERLOAD_DEFAULT_S if (e.details() or "") == GRPC_OVERLOAD_DETAILS else None


def call_with_retry(
    fn: Callable[[], T],
    *,
    attempts: int = 6,
    base_delay_s: float = 0.5,
    max_delay_s: float = 20.0,
    retry_on: Collection[grpc.StatusCode] = _RETRY_ON,
    overload_attempts: int = 40,
    retry_for_s: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying only ``retry_on`` codes with full-jitter backoff.

    The n-th retry waits ``uniform(0, min(max_delay_s, base_delay_s * 2**n))``. An overloaded
    server's refusal (``retry_after_hint``) is retried on its own budget of ``overload_attempts``:
    each waits ``uniform(hint, 2 * hint)`` (at most ``max_delay_s``), so refused callers spread out
    instead of coming back together. ``retry_for_s`` keeps retrying ``retry_on`` codes past
    ``attempts`` until that many seconds have passed since the first call (a server restarting on
    a busy host can take tens of seconds to listen again). Safe only for idempotent calls (uploads
    are keyed by upload id and seq).

    Raises:
        grpc.RpcError: a code not in ``retry_on``, or the last attempt's error.
        ValueError: ``attempts`` < 1.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    draw = (rng or random).uniform
    attempt = overloads = 0
    started = clock()
    while True:
        try:
            return fn()
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, (grpc.Call, StalledStreamError)) else None
            hint = retry_after_hint(err)
            if hint is not None and overloads < overload_attempts:
                overloads += 1
                delay = min(max_delay_s, draw(hint, 2 * hint))
                logger.info("rpc_overloaded retry=%d/%d delay_s=%.2f", overloads, overload_attempts, delay)
                sleep(delay)
                continue
            if code not in retry_on:
                raise
            elapsed = clock() - started
            if attempt >= attempts - 1 and elapsed >= retry_for_s:
                raise
            delay = draw(0.0, min(max_delay_s, base_delay_s * (2 ** min(attempt, 30))))
            if retry_for_s > elapsed:
                delay = min(delay, retry_for_s - elapsed)
            logger.warning(
                "rpc_retry attempt=%d/%d code=%s delay_s=%.2f elapsed_s=%.1f retry_for_s=%.0f",
                attempt + 1,
                attempts,
                code,
                delay,
                elapsed,
                retry_for_s,
            )
            attempt += 1
            sleep(delay)


def chunk_timeout_s(num_bytes: int, *, min_bandwidth_bps: float = 1e6) -> float:
    """Deadline for moving ``num_bytes`` at no less than ``min_bandwidth_bps`` bytes/s, with 3x slack.

    Clamped to [5, 300] s: never one deadline for a whole multi-GB transfer.
    """
    if min_bandwidth_bps <= 0:
        raise ValueError(f"min_bandwidth_bps must be > 0, got {min_bandwidth_bps}")
    return min(300.0, max(5.0, 3.0 * num_bytes / min_bandwidth_bps))
