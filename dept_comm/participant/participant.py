"""``Participant``: DiLoCo-style training of any ``nn.Module`` against the parameter server.

    from dept_comm.participant import Participant

    with Participant(model, "127.0.0.1:50051", name="w0", sync_every=50) as p:
        while not p.finished:
            loss = train_step()              # forward, backward, inner_opt.step()
            p.step(metrics={"loss": loss})   # every sync_every-th call runs p.sync()

Entering joins the run, pulls the server's shared tensors into the model (in place) and starts
the heartbeats; leaving says goodbye. ``sync`` pushes what training changed since the last pull
(the delta, through the server's codec with error feedback), commits it, waits for the round to
close, pulls the new version and loads it into the model, in place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import torch
from torch import nn

from dept_comm.codecs import codec_names
from dept_comm.errors import ManifestMismatchError
from dept_comm.pb import service_pb2
from dept_comm.streaming import StreamOpenInfo

from .client import ServerClient
from .persist import ModuleFile, WorkerState
from .replica import Replica
from .session import FINISHED, Session
from .view import LocalFilter, ModuleView, SharedView

__all__ = ["Participant", "SyncResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    """What one ``Participant.sync`` did: the round it took part in, whether its update was
    counted (``contributed``), the version it then pulled, whether the run finished, and the
    seconds spent pulling and pushing."""

    round_idx: int
    contributed: bool
    version: int
    finished: bool
    pull_s: float
    push_s: float


def manifest_difference(local: Mapping[str, torch.Tensor], server: Mapping[str, torch.Tensor]) -> str | None:
    """The first name (sorted) whose presence or shape differs between the two sets, described."""
    for name in sorted(set(local) | set(server)):
        if name not in local:
            return (
                f"the server shares {name} {tuple(server[name].shape)}, the model has no such shared tensor"
            )
        if name not in server:
            return f"the model shares {name} {tuple(local[name].shape)}, the server has no such tensor (make it local?)"
        if tuple(local[name].shape) != tuple(server[name].shape):
            return f"{name}: the model has shape {tuple(local[name].shape)}, the server {tuple(server[name].shape)}"
    return None


class Participant(Session):
    """A user's model taking part in a DiLoCo-style run (see the module docstring).

    Args:
        model: an ``nn.Module`` (its parameters are shared, except those ``local`` names) or any
            :class:`SharedView`.
        server: the parameter server's ``host:port``.
        name: a stable name: a restarted participant with the same name keeps its worker id.
        sync_every: how many ``step`` calls make a round (the inner steps, DiLoCo's H).
        local: parameters that stay local (a predicate on the state_dict name, or fnmatch
            patterns); only with a module.
        token: bearer token, if the server asks for one.
        codec: the upload codec this participant insists on (None: the server's choice; the
            server refuses the join if it uses another).
        state_dir: where the module's and the participant's state are saved each round (and
            restored from at the next start).
        timeout_s: deadline of each unary call.
        connect_timeout_s: how long to wait for the server before ``ServerUnreachableError``.
        attributes: join attributes the server's admit hook reads (opaque to the protocol).
        attributes_schema: names the attributes' set and version (the admit hook may refuse
            a schema it does not read).
        credentials: TLS channel credentials (plaintext without).

    Raises:
        ValueError: an unknown codec name, or ``local`` given with a view, or ``sync_every < 1``.
    """

    def __init__(
        self,
        model: nn.Module | SharedView,
        server: str = "127.0.0.1:50051",
        *,
        name: str = "w0",
        sync_every: int = 100,
        local: LocalFilter = None,
        token: str | None = None,
        codec: str | None = None,
        state_dir: str | Path | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 60.0,
        attributes: Mapping[str, str] | None = None,
        attributes_schema: str = "app/1",
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if codec is not None and codec not in codec_names():
            raise ValueError(f"unknown codec {codec!r}; known: {', '.join(codec_names())}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be at least 1, got {sync_every}")
        if isinstance(model, nn.Module):
            view: SharedView = ModuleView(model, local)
        elif isinstance(model, SharedView):
            if local is not None:
                raise ValueError("local applies to a module; a SharedView decides what it shares itself")
            view = model
        else:
            raise TypeError(f"model must be an nn.Module or a SharedView, got {type(model).__name__}")
        self.module = model if isinstance(model, nn.Module) else getattr(view, "module", None)
        self.view = view
        self.name = name
        self.sync_every = sync_every
        self.codec = codec
        self.attributes = dict(attributes or {})
        self.attributes_schema = attributes_schema
        self.connect_timeout_s = connect_timeout_s
        self.store = WorkerState(Path(state_dir)) if state_dir is not None else None
        client = ServerClient(
            server, token=token, timeout_s=timeout_s, retry_for_s=connect_timeout_s, credentials=credentials
        )
        super().__init__(client, Replica(view), device=view.device)
        self.steps = 0  # step() calls over the participant's life
        self._since_sync = 0
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._checked = False  # the first full pull's manifest check
        self._joined = False

    # -- the session's hooks -----------------------------------------------------------------
    def make_join_request(self) -> service_pb2.JoinRequest:
        return service_pb2.JoinRequest(
            source_id=self.name,
            worker_name=self.name,
            attributes=self.attributes,
            attributes_schema=self.attributes_schema if self.attributes else "",
            codecs=[self.codec] if self.codec is not None else codec_names(),
        )

    def check_pull(self, info: StreamOpenInfo, tensors: Mapping[str, torch.Tensor]) -> None:
        if self._checked or info.is_delta:
            return
        difference = manifest_difference(self.view.shared(), tensors)
        if difference is not None:
            raise ManifestMismatchError(difference)
        self._checked = True

    # -- life --------------------------------------------------------------------------------
    def join(self) -> None:
        """Join the run, restore the saved state (``state_dir``), pull the server's tensors into
        the model (checking names and shapes against the model's) and start the heartbeats.

        Raises:
            ServerUnreachableError: no server at the address within ``connect_timeout_s``.
            ManifestMismatchError: the model's shared tensors are not the server's.
        """
        self.client.wait_ready(self.connect_timeout_s)
        self.joined(self.client.join(self.make_join_request()))
        if self.store is not None:
            self._restore()
        self.pull(full=True)
        self._joined = True
        self.start_heartbeats()

    def close(self, reason: str = "finished") -> None:
        """Stop the heartbeats, leave the run (if joined) and close the channel."""
        self.stop_heartbeats(10.0)
        if self._joined:
            self.leave(reason)
            self._joined = False
        self.client.close()

    def __enter__(self) -> Participant:
        try:
            self.join()
        except BaseException:
            self.close("failed to join")
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close("finished" if kind is None else f"error: {kind.__name__}")

    # -- rounds ------------------------------------------------------------------------------
    @property
    def round(self) -> int:
        """The round the server is in (as this participant last heard)."""
        return int(self.info.round_idx)

    @property
    def version(self) -> int:
        """The version of the shared tensors the replica (and the model) holds; -1 before a pull."""
        return self.replica.version

    @property
    def finished(self) -> bool:
        """Whether the run is over (no more rounds)."""
        return self.info.state == FINISHED

    def digest(self) -> bytes:
        """xxh3-128 of the replica's shared tensors: equal to the server's for the same version."""
        return self.replica.digest()

    def step(self, metrics: Mapping[str, Any] | None = None) -> SyncResult | None:
        """Count one inner step (and average ``metrics`` over the round); every ``sync_every``-th
        call runs :meth:`sync` and returns its result."""
        self.steps += 1
        self._since_sync += 1
        for key, value in (metrics or {}).items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1
        if self._since_sync >= self.sync_every:
            return self.sync()
        return None

    def sync(self, metrics: Mapping[str, Any] | None = None) -> SyncResult:
        """End this participant's round: push the delta, commit, wait for the round to close,
        pull the new version and load it into the model in place. ``metrics`` (and those given to
        ``step``; their "loss" is the round's train loss) travel with the commit."""
        if not self._joined:
            raise RuntimeError("join first (use the participant as a context manager)")
        round_idx = self.round
        means = {k: self._sums[k] / self._counts[k] for k in self._sums}
        means.update({k: float(v) for k, v in (metrics or {}).items()})
        contributed = False
        self.comm_s = {"pull_s": 0.0, "push_s": 0.0}

        def contribute(r: int) -> None:
            nonlocal contributed
            loss = means.get("loss", math.nan)
            self.prepare_update(r, loss=loss, metrics=means)
            self.push()
            contributed = True

        if not self.finished:
            self.play_round(contribute)
        self.pending = None
        self.pull_after_run()
        self._since_sync = 0
        self._sums, self._counts = {}, {}
        if self.store is not None:
            self._save(round_idx)
        return SyncResult(
            round_idx=round_idx,
            contributed=contributed,
            version=self.version,
            finished=self.finished,
            pull_s=self.comm_s["pull_s"],
            push_s=self.comm_s["push_s"],
        )

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The participant's state: replica version and digest, step count, and the
        error-feedback residuals (tensors under ``feedback``)."""
        return {
            "version": self.version,
            "digest": self.digest().hex(),
            "steps": self.steps,
            "round_idx": self.round,
            "feedback": self.feedback.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``'s output: the step count and the residuals (the next
        pull is a full one, so the replica is rebuilt from the server)."""
        self.steps = int(state.get("steps", 0))
        self.feedback.load_state_dict(dict(state.get("feedback", {})))

    def _trainer_file(self) -> ModuleFile | None:
        return ModuleFile(self.module) if self.module is not None else None

    def _save(self, round_idx: int) -> None:
        assert self.store is not None
        trainer = self._trainer_file()
        if trainer is None:
            return
        state = self.state_dict()
        self.store.save(
            round_idx=round_idx,
            trainer=trainer,
            feedback=state.pop("feedback"),
            data={},
            participant=state,
        )

    def _restore(self) -> None:
        assert self.store is not None
        saved = self.store.load()
        trainer = self._trainer_file()
        if saved is None or trainer is None:
            return
        trainer.load(saved["trainer_path"])
        self.load_state_dict({**saved.get("participant", {}), "feedback": saved["feedback"]})
        logger.info("participant %s continues from round %d", self.name, saved["round_idx"])
