"""dept_comm: a low-communication library for DiLoCo-style training over gRPC.

A :class:`ParameterServer` holds any named set of tensors and runs rounds over them; a
:class:`Participant` wraps a user's ``nn.Module`` (its inner optimizer and loop stay the user's)
and every ``sync_every`` steps pushes the compressed update with error feedback, waits for the
round to close and pulls the new tensors, bit-identical on every participant. Underneath: tensor
codecs, chunked streams with checksums and an explicit commit, byte accounting, the round
coordinator and outer optimizers. ``docs/LIBRARY.md`` describes the concepts, the API and the
wire protocol.

Server::

    with ParameterServer(model.state_dict(), ServerConfig(port=50051, workers=2, rounds=10)) as server:
        server.wait()

Participant::

    with Participant(model, server="host:50051", name="w0", sync_every=100) as p:
        while not p.finished:
            ...  # forward, backward, inner_opt.step()
            p.step()
"""

from __future__ import annotations

# First, before anything imports grpc: gRPC reads GRPC_EXPERIMENTS once, at its import.
from dept_comm import grpc_env as grpc_env  # isort: skip
from dept_comm.accounting import RoundMetrics
from dept_comm.codecs import Codec, codec_names, get_codec
from dept_comm.errors import (
    CommitMismatchError,
    DeptError,
    ManifestMismatchError,
    ServerUnreachableError,
)
from dept_comm.outer import FedAvg, Nesterov, OuterOptimizer, build_outer
from dept_comm.participant import LocalFilter, ModuleView, Participant, SharedView, SyncResult
from dept_comm.server import ParameterServer, ServerConfig, ServerHooks

__version__ = "0.1.0"

__all__ = [
    "Codec",
    "CommitMismatchError",
    "DeptError",
    "FedAvg",
    "LocalFilter",
    "ManifestMismatchError",
    "ModuleView",
    "Nesterov",
    "OuterOptimizer",
    "ParameterServer",
    "Participant",
    "RoundMetrics",
    "ServerConfig",
    "ServerHooks",
    "ServerUnreachableError",
    "SharedView",
    "SyncResult",
    "build_outer",
    "codec_names",
    "get_codec",
]
