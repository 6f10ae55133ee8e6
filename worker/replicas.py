"""How a node's ranks hold the model: whole on every rank (DDP) or sharded across them (FSDP2).

Both keep rank 0's ``setup.model`` a whole, ordinary :class:`DeptModel` (what the round loop
pulls into, evaluates, and computes the update from) and give every rank the same four steps,
which every rank calls together (each is a collective where the mode needs one):

- ``sync``: every rank takes rank 0's model (after a pull) and records the digests of the body
  and of the whole model it then holds (``digests-rank{R}.jsonl``);
- ``after_train``: rank 0's whole model catches up with the trained one;
- ``save``: rank 0 writes the trainer file (model, optimizer state, step);
- ``load``: every rank continues from such a file.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from dept_comm.digest import tensors_digest
from dept_comm.names import BODY_PREFIX
from dept_model import Trainer
from dept_model.state import load_state, save_state

from .dist import Node
from .setup import WorkerSetup

PARALLEL_MODES = ("auto", "ddp", "fsdp")
FSDP_PRESETS = frozenset({"1.3b"})  # the presets whose training state does not fit one GPU at useful batches


def parallel_mode(flag: str, preset: str) -> str:
    """``ddp`` or ``fsdp`` for ``--parallel flag`` and the run's model preset (auto: fsdp for 1.3b)."""
    if flag == "auto":
        return "fsdp" if preset in FSDP_PRESETS else "ddp"
    if flag not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {flag!r}")
    return flag


def body_digest(state: Mapping[str, Any]) -> str:
    """The server's body digest over the ``body.*`` tensors of a DeptModel state dict."""
    body = {
        k: v.to("cpu", torch.float32)
        for k, v in state.items()
        if k.startswith(BODY_PREFIX) and isinstance(v, torch.Tensor)
    }
    return tensors_digest(body).hex()


def rank_digests_path(state_dir: Path, rank: int) -> Path:
    return state_dir / f"digests-rank{rank}.jsonl"


def record_rank_digest(state_dir: Path, rank: int, version: int, state: Mapping[str, Any]) -> str:
    """Append what this rank holds after a pull: the body's digest (the server's ``body_digest``)
    and the whole model's (embeddings included); returns the body's."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    body = body_digest(tensors)
    row = {"version": version, "body_digest": body, "model_digest": tensors_digest(tensors).hex()}
    with open(rank_digests_path(state_dir, rank), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return body


class DdpReplicas:
    """The whole model on every rank; ``DistributedDataParallel`` averages the gradients."""

    mode = "ddp"

    def __init__(self, node: Node, setup: WorkerSetup, compile_step: bool) -> None:
        self.node, self.setup = node, setup
        device_ids = [node.device.index] if node.device.type == "cuda" else None
        ddp = DistributedDataParallel(setup.model, device_ids=device_ids, **_NO_BUFFER_SYNC)
        # The trainer keeps stepping its own optimizer over the model's parameters (which DDP
        # shares); only the forward goes through DDP, whose backward hooks all-reduce the gradients.
        setup.trainer._forward = torch.compile(ddp) if compile_step else ddp

    def sync(self, version: int, state_dir: Path) -> str:
        state = self.setup.model.state_dict()
        self.node.broadcast(t for _, t in sorted(state.items()))
        return record_rank_digest(state_dir, self.node.rank, version, state)

    def after_train(self) -> None:
        """Nothing to do: rank 0's model is the one trained."""

    def save(self, path: str | os.PathLike[str] | None, *, include_model: bool = True) -> None:
        if path is not None:
            self.setup.trainer.save(path, include_model=include_model)

    def load(self, path: str | os.PathLike[str]) -> None:
        self.setup.trainer.load(path)  # every rank reads the node-local file


class FsdpReplicas:
    """The training model sharded across the ranks (FSDP2 ``fully_shard`` per block and at the root).

    Parameters, gradients and AdamW moments are split N ways; rank 0 also keeps a whole copy,
    ``setup.model``, for the round loop (pull, evaluation, update), refreshed after each round's
    inner steps. The trainer file holds the whole model and the whole optimizer state (keyed by
    parameter name), gathered to rank 0.
    """

    mode = "fsdp"

    def __init__(self, node: Node, setup: WorkerSetup, compile_step: bool) -> None:
        del compile_step  # the trainer's own TrainConfig.compile applies to the sharded model
        self.node, self.setup = node, setup
        whole = setup.model
        self.sharded = copy.deepcopy(whole) if node.is_leader else whole
        for block in self.sharded.body.blocks:
            fully_shard(block)
        fully_shard(self.sharded)
        setup.trainer = Trainer(self.sharded, setup.trainer.config, node.device)
        if not node.is_leader:
            setup.model = self.sharded  # no whole copy beside rank 0
        self.whole = whole if node.is_leader else None

    def sync(self, version: int, state_dir: Path) -> str:
        full = self.whole.state_dict() if self.whole is not None else {}
        set_model_state_dict(
            self.sharded, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        # Reassemble the shards on every rank: proof that each holds its part of the pulled body.
        gathered = get_model_state_dict(self.sharded, options=StateDictOptions(full_state_dict=True))
        return record_rank_digest(state_dir, self.node.rank, version, gathered)

    def after_train(self) -> None:
        full = get_model_state_dict(
            self.sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.whole is not None:
            self.whole.load_state_dict(full, strict=True)

    def save(self, path: str | os.PathLike[str] | None, *, include_model: bool = True) -> None:
        optimizer = get_optimizer_state_dict(
            self.sharded,
            self.setup.trainer.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if path is None or self.whole is None:
            return
        state: dict[str, Any] = {
            "format": 1,
            "parallel": self.mode,
            "step": self.setup.trainer.step_count,
            "optimizer": optimizer,
        }
        if include_model:
            state["model"] = self.whole.state_dict()
        save_state(path, state)

    def load(self, path: str | os.PathLike[str]) -> None:
        model: dict[str, Any] = {}
        optimizer: dict[str, Any] = {}
        step = 0
        if self.whole is not None:
            state = load_state(path)
            if state.get("parallel") != self.mode:
                raise ValueError(
                    f"{path} was not written by an FSDP node: run with --parallel ddp, or a fresh --state-dir"
                )
            model, optimizer, step = state["model"], state["optimizer"], int(state["step"])
            self.whole.load_state_dict(model, strict=True)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.sharded, model, options=options)
        set_optimizer_state_dict(self.sharded, self.setup.trainer.optimizer, optimizer, options=options)
        self.setup.trainer.step_count = self.node.broadcast_int(step)


Replicas = DdpReplicas | FsdpReplicas


def make_replicas(mode: str, node: Node, setup: WorkerSetup, compile_step: bool) -> Replicas:
    """Wrap ``setup`` (built alike on every rank) for ``mode`` (ddp or fsdp)."""
    if mode == "fsdp":
        return FsdpReplicas(node, setup, compile_step)
    return DdpReplicas(node, setup, compile_step)


def _buffer_sync_off() -> dict[str, Any]:
    """Buffers (TRIM's row maps) are the same on every rank and never trained: no broadcast before
    each forward. torch 2.13 renamed the switch (``broadcast_buffers`` is deprecated there)."""
    import inspect  # noqa: PLC0415 (once, at import)

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


_NO_BUFFER_SYNC = _buffer_sync_off()
