"""dept-worker on SIGTERM/SIGINT: drop the round in flight, tell the server it leaves, exit 128 + signal.

The handler raises ``Terminated`` in the main thread, wherever it is (training, a pull, a push
waiting on its stream). Unwinding leaves the round loop (its heartbeat thread stops) and closes
the gRPC channel, which cancels an upload still streaming; nothing is committed, so the server
counts nothing from it. A fresh, short-lived channel then sends ``Leave`` (reason
``terminated``): the server drops the worker's open upload and stops waiting for it in the
round. The exit status is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell
reports a process killed by that signal: the worker did not finish its run.

A second signal while leaving takes its default action (the process ends at once).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import grpc

from dept_comm.channel import SESSION_METADATA_KEY, channel_options, open_channel
from dept_comm.participant.client import current_session
from dept_comm.pb import service_pb2
from dept_comm.rounds import worker_id_for
from dept_comm.service import ParameterServerStub

from .config import WorkerConfig

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LEAVE_TIMEOUT_S = 10.0  # a terminated worker does not wait a full RPC timeout to say goodbye
LOCAL_SUBCHANNEL_POOL = "grpc.use_local_subchannel_pool"


class Terminated(BaseException):
    """Raised in the main thread by a stop signal (a BaseException: no ``except Exception`` eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    for sig in STOP_SIGNALS:  # the next one ends the process at once
        signal.signal(sig, signal.SIG_DFL)
    raise Terminated(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise ``Terminated``.

    The old handlers come back when the block ends normally or by another exception; after a
    ``Terminated`` the default actions stay, so a second signal while leaving ends the process.
    """
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_terminated)
    try:
        yield
    except Terminated:
        raise
    except BaseException:
        _restore(previous)
        raise
    _restore(previous)


def _restore(handlers: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def leave_terminated(config: WorkerConfig) -> None:
    """Send Leave(reason="terminated") for this worker on a new connection; failures are logged.

    The worker id is the server's stable id of the worker name, so this works whether or not the
    join completed before the signal (the server answers an unknown id with NOT_FOUND, logged).
    The channel has its own subchannel pool: gRPC would otherwise hand it the TCP connection of
    the channel just closed, if not yet torn down, where the Leave would queue behind whatever
    of the cancelled upload is still in the socket buffers (megabytes on a slow link).
    """
    channel = open_channel(
        config.server,
        credentials=config.channel_credentials(),
        server_name=config.tls_server_name,
        options=[*channel_options(), (LOCAL_SUBCHANNEL_POOL, 1)],
    )
    metadata: tuple[tuple[str, str], ...] = (
        (("authorization", f"Bearer {config.token}"),) if config.token else ()
    )
    session = current_session()
    if session is not None:  # only this worker's own session may make it leave
        metadata = (*metadata, (SESSION_METADATA_KEY, session))
    request = service_pb2.LeaveRequest(worker_id=worker_id_for(config.worker_name), reason="terminated")
    try:
        ParameterServerStub(channel).Leave(request, timeout=LEAVE_TIMEOUT_S, metadata=metadata)
    except grpc.RpcError as err:
        logger.warning("leave failed: %s", err)
    finally:
        channel.close()


def run_until_signalled(config: WorkerConfig, run: Callable[[WorkerConfig], int]) -> int:
    """``run(config)``'s exit status, or 128 + signal after a SIGTERM/SIGINT stopped it and it left."""
    try:
        with stop_on_signals():
            return run(config)
    except Terminated as stop:
        logger.warning("%s: leaving the run (an update not yet committed is dropped)", stop)
        leave_terminated(config)
        logger.info("left the run (reason=terminated); exit status %d", stop.exit_code)
        return stop.exit_code
