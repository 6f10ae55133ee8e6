"""gRPC's TCP transport for processes that stream tensors: chosen before ``grpc`` is imported.

gRPC core reads ``GRPC_EXPERIMENTS`` once, when ``grpc`` is first imported. Since grpcio 1.80
Python runs on gRPC's EventEngine: a connection's socket is read and written on EventEngine
worker threads, and each message is handed from there to the completion queue's thread and from
that to the handler. With ``event_engine_client`` and ``event_engine_listener`` off, the thread
polling the completion queue reads and writes the socket itself (gRPC's poll-based transport, the
one Python used up to 1.79), so a 1 MiB chunk crosses fewer threads.

Measured with ``dept-bench wire`` on a 2-core host (256 MiB fp32, one stream; six runs each,
interleaved with runs on gRPC's defaults; ``benchmarks/results/2026-11-28-grpc-transport``): push
0.46-0.53 of one raw TCP socket against 0.41-0.47, pull 0.59-0.71 against 0.52-0.61; CPU ms per
MiB pushed 0.41-0.53 (client) and 0.45-0.53 (server) against 0.47-0.55 and 0.54-0.67. The price,
measured with ``dept-bench load --runs 64x64``: the server's peak over idle is ~19 MiB higher (3.52-3.93
against 3.31-3.65 x body, seven runs each; docs/SCALE.md).

Importing ``dept_comm`` applies it (this module is the first thing ``dept_comm`` imports), so
every dept CLI and any program that imports ``dept_comm`` before ``grpc`` gets it. It is left
alone when:

- ``GRPC_EXPERIMENTS`` is already set, even to the empty string (which keeps gRPC's defaults):
  the user's choice wins, and it is how to turn this off;
- ``grpc`` was imported first: gRPC has read its settings; setting the variable now would only
  reach child processes, inconsistently;
- the installed grpcio is outside the versions it was measured on (:data:`TESTED_GRPCIO`): a
  later grpcio may drop these experiments (gRPC plans to remove them once EventEngine has run
  two releases in Python).

Child processes inherit the variable, so a server or worker started from a process that imported
``dept_comm`` runs on the same transport.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import metadata

__all__ = ["ENV", "EXPERIMENTS", "TESTED_GRPCIO", "GrpcTransport", "choose", "transport"]

ENV = "GRPC_EXPERIMENTS"
EXPERIMENTS = "-event_engine_client,-event_engine_listener"
TESTED_GRPCIO = ((1, 80), (1, 85))  # first and last (major, minor) measured, inclusive


@dataclass(frozen=True, slots=True)
class GrpcTransport:
    """What this process's gRPC runs on and why: ``experiments`` is ``GRPC_EXPERIMENTS`` as gRPC
    reads it (None: unset), ``source`` one of ``dept_comm``, ``user``, ``grpc-imported-first``,
    ``untested-grpcio`` or ``no-grpcio``."""

    experiments: str | None
    source: str
    grpcio: str

    def describe(self) -> str:
        """One log line: ``grpc_transport grpcio=1.85.3 experiments=... source=dept_comm``."""
        shown = "(gRPC defaults)" if not self.experiments else self.experiments
        return f"grpc_transport grpcio={self.grpcio} experiments={shown} source={self.source}"


def _version(text: str) -> tuple[int, int] | None:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def choose(current: str | None, *, grpc_imported: bool, grpcio: str | None) -> GrpcTransport:
    """Decide ``GRPC_EXPERIMENTS`` from its current value, whether ``grpc`` is imported already
    and the installed grpcio version (None: not installed). Pure; :func:`_apply` acts on it."""
    version = grpcio or "none"
    if current == EXPERIMENTS:  # set here, or by a parent process that imported dept_comm
        return GrpcTransport(current, "dept_comm", version)
    if current is not None:
        return GrpcTransport(current, "user", version)
    if grpc_imported:
        return GrpcTransport(None, "grpc-imported-first", version)
    if grpcio is None:
        return GrpcTransport(None, "no-grpcio", version)
    parsed = _version(grpcio)
    if parsed is None or not TESTED_GRPCIO[0] <= parsed <= TESTED_GRPCIO[1]:
        return GrpcTransport(None, "untested-grpcio", version)
    return GrpcTransport(EXPERIMENTS, "dept_comm", version)


def _installed_grpcio() -> str | None:
    try:
        return metadata.version("grpcio")
    except metadata.PackageNotFoundError:
        return None


def _apply() -> GrpcTransport:
    chosen = choose(os.environ.get(ENV), grpc_imported="grpc" in sys.modules, grpcio=_installed_grpcio())
    if chosen.source == "dept_comm" and chosen.experiments is not None:
        os.environ[ENV] = chosen.experiments
    return chosen


_TRANSPORT = _apply()


def transport() -> GrpcTransport:
    """What :mod:`dept_comm` decided when it was first imported (log it with ``describe()``)."""
    return _TRANSPORT
