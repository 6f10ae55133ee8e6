"""One worker across a node's ranks under torchrun: process group, rank 0's commands, collectives.

Rank 0 (the leader) alone talks to the server. It tells the other ranks (followers) what to do
next through JSON commands in the process group's key-value store (``cmd/0``, ``cmd/1``, ... in
order), so every rank takes the same path through a round; tensors then move by collectives
(``broadcast``, ``all_reduce``) on the process group: ``gloo`` on CPU, ``nccl`` on CUDA.

A follower waits for the next command without a deadline (a round may wait hours for slow peers),
but not for a silent leader: rank 0 bumps a counter in the store every few seconds from a thread,
and a follower that sees it stand still for ``timeout_s`` gives up. Each collective is bounded by
the same ``timeout_s`` (the process group's timeout). torchrun itself stops every rank once one
exits with an error, and rank 0 sends ``stop`` on its way out whatever the reason.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class NodeError(RuntimeError):
    """The node's ranks lost each other: rank 0 went silent, or it stopped the node with an error."""


@dataclass(frozen=True, slots=True)
class NodeEnv:
    """Where this process sits in the torchrun job (from the RANK/WORLD_SIZE/LOCAL_RANK variables)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> NodeEnv | None:
        """The launch variables torchrun sets, or None in a process not started by a launcher."""
        if not all(name in os.environ for name in LAUNCH_ENV):
            return None
        env = cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
        if not 0 <= env.rank < env.world_size:
            raise ValueError(f"RANK={env.rank} outside WORLD_SIZE={env.world_size}")
        return env


def torchrun_argv(argv: Sequence[str], nproc_per_node: int) -> list[str]:
    """The command that runs this worker's own arguments under torchrun on ``nproc_per_node`` ranks.

    ``--nproc-per-node`` is taken out of ``argv`` (each rank is an ordinary ``dept_worker.cli``);
    ``--standalone`` gives the job its own rendezvous on a free local port.
    """
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            rest.append(arg)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc_per_node),
        "-m",
        "dept_worker.cli",
        *rest,
    ]


class Node:
    """This process's share of a torchrun worker: rank, device, process group and command channel."""

    def __init__(self, env: NodeEnv, device: torch.device, *, timeout_s: float) -> None:
        self.rank = env.rank
        self.world_size = env.world_size
        self.device = device
        self.timeout_s = timeout_s
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            self.backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        # The store that torchrun's rendezvous set up (a private accessor, stable since torch 1.x).
        self._store = dist.distributed_c10d.PrefixStore(
            "dept-node/", dist.distributed_c10d._get_default_store()
        )
        self._seq = 0
        self._forgotten = 0  # commands below this sequence number were deleted from the store
        self._stop_beats = threading.Event()
        self._beats: threading.Thread | None = None
        if self.is_leader:
            self._beats = threading.Thread(target=self._beat, name="node-alive", daemon=True)
            self._beats.start()
        logger.info(
            "node rank=%d world_size=%d device=%s backend=%s",
            self.rank,
            self.world_size,
            device,
            self.backend,
        )

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def _beat_s(self) -> float:
        return max(0.05, min(2.0, self.timeout_s / 8))

    def _beat(self) -> None:
        while not self._stop_beats.wait(self._beat_s):
            try:
                self._store.add("alive", 1)
            except (RuntimeError, OSError) as err:  # the store went away: the node is ending
                logger.debug("node alive beat failed: %s", err)
                return

    # -- commands (rank 0 -> every other rank) ---------------------------------------------------
    def send(self, op: str, **fields: Any) -> int:
        """Rank 0: publish the next command; returns its sequence number."""
        if not self.is_leader:
            raise RuntimeError("only rank 0 sends node commands")
        seq = self._seq
        self._store.set(f"cmd/{seq}", json.dumps({"op": op, **fields}))
        self._seq += 1
        return seq

    def forget(self, upto: int) -> None:
        """Rank 0: delete commands up to ``upto`` from the store, once every rank has read them."""
        for seq in range(self._forgotten, upto + 1):
            self._store.delete_key(f"cmd/{seq}")
        self._forgotten = max(self._forgotten, upto + 1)

    def receive(self) -> tuple[int, dict[str, Any]]:
        """A follower: wait for rank 0's next command; returns (sequence number, command).

        Raises:
            NodeError: rank 0 showed no sign of life for ``timeout_s``.
        """
        key = f"cmd/{self._seq}"
        alive, since, pause = -1, time.monotonic(), 0.001
        while not self._store.check([key]):
            beats = self._store.add("alive", 0)
            now = time.monotonic()
            if beats != alive:
                alive, since = beats, now
            elif now - since > self.timeout_s:
                raise NodeError(f"rank 0 sent no command and no sign of life for {self.timeout_s:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        command: dict[str, Any] = json.loads(self._store.get(key))
        seq = self._seq
        self._seq += 1
        return seq, command

    def put_json(self, key: str, value: Any) -> None:
        self._store.set(key, json.dumps(value))

    def take_json(self, key: str) -> Any:
        """Wait (up to the store's timeout) for ``key``, read it and delete it."""
        value = json.loads(self._store.get(key))
        self._store.delete_key(key)
        return value

    # -- collectives ------------------------------------------------------------------------------
    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite every rank's ``tensors`` in place with rank 0's (same order on every rank)."""
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t, src=0)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self) -> None:
        self._stop_beats.set()
        if self._beats is not None:
            self._beats.join(timeout=10)
        if dist.is_initialized():
            dist.destroy_process_group()


def single_process_position(data: Mapping[str, Any], where: Path) -> dict[str, int]:
    """The data position a single-process worker continues from: its own, or a 1-rank DDP node's
    (whose one shard is the whole stream); a node of more ranks, or an FSDP one, needs torchrun.

    Raises:
        ValueError: the state belongs to a node this process cannot continue.
    """
    ranks = data.get("ranks")
    if ranks is None:
        return dict(data)
    mode = data.get("parallel", "ddp")
    if len(ranks) == 1 and mode == "ddp":
        return dict(ranks[0])
    raise ValueError(
        f"{where} holds the state of a {len(ranks)}-rank {mode} node: run it under torchrun with "
        f"--nproc-per-node {len(ranks)} --parallel {mode}"
    )
