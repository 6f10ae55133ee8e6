"""dept_comm.participant: the client side, wrapping a user's model and inner optimizer.

:class:`Participant` trains any ``nn.Module`` DiLoCo-style against the parameter server in a
few lines; :class:`ModuleView` (or any :class:`SharedView`) says which tensors are shared;
:class:`Replica` keeps the bit-exact copy of the server's shared tensors the updates are
measured against; :class:`Session` is the round protocol itself (pulls, resumable pushes,
refusals, heartbeats), which DEPT's worker builds on; :class:`ServerClient` makes the calls.
"""

from __future__ import annotations

from .client import ServerClient
from .participant import Participant, SyncResult
from .persist import ModuleFile, WorkerState
from .replica import Replica
from .session import Session
from .view import LocalFilter, ModuleView, SharedView, local_predicate

__all__ = [
    "LocalFilter",
    "ModuleFile",
    "ModuleView",
    "Participant",
    "Replica",
    "ServerClient",
    "Session",
    "SharedView",
    "SyncResult",
    "WorkerState",
    "local_predicate",
]
