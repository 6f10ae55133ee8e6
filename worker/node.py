"""One DEPT worker across a node's N ranks (torchrun): rank 0 runs the round loop, the others follow.

Rank 0 alone talks to dept-server (join, pull, push, commit, heartbeat, leave) through the
ordinary :class:`~dept_worker.loop.Worker` (on :class:`dept_comm.participant.Session`); at each step that involves the whole node it sends
the other ranks a command (``worker.dist``) and they act in lockstep:

- ``setup``: the run's configuration from the join reply and the state dir; every rank builds the
  same model (same seed), reads its own disjoint shard of the source's training windows and holds
  the model per ``--parallel`` (``worker.replicas``): whole under ``DistributedDataParallel``, or
  sharded by FSDP2 ``fully_shard`` (the default for the 1.3b preset).
- ``restore``: the trainer file (model with the private embeddings, AdamW moments, step count)
  rank 0 found in the state dir, and each rank's data position; every rank continues from them.
- ``sync`` after each verified pull: rank 0's model (the pulled body and the embeddings) goes to
  every rank, and each rank records the digest of the body it then holds (``digests-rank{R}.jsonl``).
- ``train``: the inner steps, data-parallel (each rank its own batches, gradients averaged across
  the ranks, so the replicas stay identical); the loss reported is the mean over the ranks. Rank 0
  then computes the update once from its whole model and pushes it.
- ``save``: each rank hands rank 0 its data position, which rank 0 saves with the rest of the state.
- ``stop``: the run ended (or rank 0 failed); every rank exits with rank 0's exit code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from dept_comm.participant.client import ServerClient
from dept_comm.participant.persist import WorkerState
from dept_comm.pb import service_pb2
from dept_model.data import TokenBatches
from dept_model.tokenizer import vocab_digest

from .config import WorkerConfig
from .device import resolve_device
from .dist import Node, NodeEnv, NodeError, torchrun_argv
from .loop import Worker, connect
from .replicas import Replicas, make_replicas, parallel_mode
from .setup import WorkerSetup, build_setup, resolve_tokenizer

logger = logging.getLogger(__name__)


# -- launching --------------------------------------------------------------------------------------
def prepare(config: WorkerConfig, env: NodeEnv | None, nproc_per_node: int) -> WorkerConfig:
    """``config`` with its --device resolved for this process (or checked for the ranks to launch).

    Raises:
        ValueError: the device cannot serve this rank (no CUDA, GPU index out of range, ...).
    """
    if env is None and nproc_per_node > 1:  # the launcher: check what its last rank will ask for
        resolve_device(config.device, local_rank=nproc_per_node - 1, world_size=nproc_per_node)
        return config
    local_rank, world_size = (env.local_rank, env.world_size) if env is not None else (0, 1)
    device = resolve_device(config.device, local_rank=local_rank, world_size=world_size)
    return dataclasses.replace(config, device=str(device))


def launch_torchrun(argv: Sequence[str], nproc_per_node: int) -> None:
    """Replace this process with ``torchrun --standalone --nproc-per-node N -m dept_worker.cli ...``."""
    command = torchrun_argv(argv, nproc_per_node)
    logger.info("launching %s", " ".join(command))
    os.execv(command[0], command)


# -- what every rank builds -------------------------------------------------------------------------
def shard_batches(batches: TokenBatches, rank: int, world_size: int) -> TokenBatches:
    """Rank ``rank``'s disjoint share of the training windows, as its own resumable batch stream.

    The windows are split into ``world_size`` contiguous runs (rank r: windows
    ``[r * W // N, (r + 1) * W // N)``); each rank shuffles its own run with its own seed.

    Raises:
        ValueError: fewer windows than ranks.
    """
    num_windows, seq_len = batches.num_windows, batches.seq_len
    if num_windows < world_size:
        raise ValueError(
            f"the source has {num_windows} training windows of {seq_len} tokens, fewer than the "
            f"{world_size} ranks: use fewer ranks or a shorter --seq-len"
        )
    lo, hi = rank * num_windows // world_size, (rank + 1) * num_windows // world_size
    tokens = batches.tokens[lo * seq_len : hi * seq_len + 1]
    return TokenBatches(tokens, seq_len=seq_len, batch_size=batches.batch_size, seed=batches.seed + rank)


def node_setup(
    config: WorkerConfig, run: dict[str, Any], tokenizer: Tokenizer, digest: str, node: Node
) -> tuple[WorkerSetup, Replicas]:
    """The ordinary worker setup with this rank's data shard, the model held per ``--parallel``."""
    setup = build_setup(config, run, tokenizer, digest)
    setup.train_batches = shard_batches(setup.train_batches, node.rank, node.world_size)
    mode = parallel_mode(config.parallel, str(run["model"]))
    replicas = make_replicas(mode, node, setup, config.compile)
    logger.info("node rank=%d trains %s model=%s", node.rank, mode, run["model"])
    return setup, replicas


def rank_positions(data: Mapping[str, Any], world_size: int, where: Path) -> list[dict[str, int]] | None:
    """Each rank's saved data position, or None (with a warning) when they cannot be reused."""
    ranks = data.get("ranks")
    if not isinstance(ranks, list) and world_size == 1:  # a single-process worker's: the same stream
        return [dict(data)]
    if not isinstance(ranks, list):
        logger.warning(
            "%s holds a single-process worker's state: the data position of each of the %d shards "
            "starts afresh (model, embeddings and optimizer state continue)",
            where,
            world_size,
        )
        return None
    if len(ranks) != world_size:
        logger.warning(
            "%s was written by a %d-rank worker, this one has %d: the data positions start afresh "
            "(model, embeddings and optimizer state continue)",
            where,
            len(ranks),
            world_size,
        )
        return None
    return [dict(r) for r in ranks]


# -- rank 0 -----------------------------------------------------------------------------------------
class NodeWorker(Worker):
    """Rank 0's worker: the round protocol of :class:`Worker`, with the other ranks kept in step."""

    def __init__(
        self,
        config: WorkerConfig,
        client: ServerClient,
        setup: WorkerSetup,
        reply: service_pb2.JoinReply,
        store: WorkerState,
        node: Node,
        replicas: Replicas,
    ) -> None:
        self.node, self.replicas = node, replicas  # before Worker.__init__, which restores the state
        super().__init__(config, client, setup, reply, store)

    def _restore(self) -> None:
        saved = self.store.load()
        if saved is None:
            self.node.send("restore", trainer=None, data=None)
            return
        data = saved["data"]
        saved_mode = data.get("parallel", "ddp")
        if saved_mode != self.replicas.mode:
            raise ValueError(
                f"{self.store.dir} holds the state of a {saved_mode} node: run with --parallel {saved_mode}"
            )
        positions = rank_positions(data, self.node.world_size, self.store.dir)
        path = str(saved["trainer_path"])
        self.node.send("restore", trainer=path, data=positions)
        self.replicas.load(path)
        self.feedback.load_state_dict(saved["feedback"])
        if positions is not None:
            self.setup.train_batches.load_state_dict(positions[0])

    def _save(self, round_idx: int) -> None:
        seq = self.node.send("save", round_idx=round_idx)
        positions = [self.setup.train_batches.state_dict()]
        positions += [self.node.take_json(f"data/{seq}/{r}") for r in range(1, self.node.world_size)]
        self.node.forget(seq)  # every rank answered this command, so it read all before it
        self.store.save(
            round_idx=round_idx,
            trainer=self.replicas,
            feedback=self.feedback.state_dict(),
            data={"world_size": self.node.world_size, "parallel": self.replicas.mode, "ranks": positions},
        )

    def pull(self, full: bool = False) -> None:
        super().pull(full)
        self.node.send("sync", version=self.replica.version)
        self.replicas.sync(self.replica.version, self.store.dir)

    def train(self) -> tuple[float, int]:
        self.node.send("train", steps=self.config.inner_steps)
        loss, tokens = super().train()
        self.replicas.after_train()
        self.last_loss = self.node.mean(loss)
        return self.last_loss, tokens * self.node.world_size


def lead(config: WorkerConfig, node: Node) -> int:
    """Rank 0: join, set the node up, run the rounds; ``stop`` the other ranks whatever happens."""
    state_dir = config.state_dir or Path(tempfile.mkdtemp(prefix=f"dept-worker-{config.source}-"))
    code = 1
    try:
        store = WorkerState(state_dir)
        tokenizer = resolve_tokenizer(config, state_dir)
        client = connect(config)
        try:
            digest = vocab_digest(tokenizer)
            reply = client.join(Worker.join_request(config, digest))
            run_info = json.loads(reply.run_config_json)
            node.send("setup", run=run_info, state_dir=str(state_dir))
            setup, replicas = node_setup(config, run_info, tokenizer, digest, node)
            code = NodeWorker(config, client, setup, reply, store, node, replicas).run()
        finally:
            client.close()
    finally:
        try:
            node.send("stop", code=code)
        except RuntimeError as err:  # the store is gone: torchrun is stopping the node anyway
            logger.warning("could not tell the other ranks to stop: %s", err)
    return code


# -- ranks 1..N-1 -----------------------------------------------------------------------------------
def follow(config: WorkerConfig, node: Node) -> int:
    """Any other rank: do what rank 0 says until it says stop; returns rank 0's exit code."""
    _, command = node.receive()
    if command["op"] == "stop":
        return int(command["code"])
    if command["op"] != "setup":
        raise NodeError(f"expected the node's setup from rank 0, got {command['op']!r}")
    state_dir = Path(command["state_dir"])
    tokenizer = resolve_tokenizer(config, state_dir)  # rank 0 trained and saved it if needed
    setup, replicas = node_setup(config, command["run"], tokenizer, vocab_digest(tokenizer), node)
    device = torch.device(config.device)
    while True:
        seq, command = node.receive()
        op = command["op"]
        if op == "restore":
            if command["trainer"] is not None:
                replicas.load(command["trainer"])
            if command["data"] is not None:
                setup.train_batches.load_state_dict(command["data"][node.rank])
        elif op == "sync":
            replicas.sync(int(command["version"]), state_dir)
        elif op == "train":
            losses = []
            for _ in range(int(command["steps"])):
                x, y = setup.train_batches.next_batch()
                losses.append(setup.trainer.step(x.to(device), y.to(device)))
            replicas.after_train()
            node.mean(sum(losses) / len(losses))
        elif op == "save":
            node.put_json(f"data/{seq}/{node.rank}", setup.train_batches.state_dict())
            replicas.save(None)
        elif op == "stop":
            return int(command["code"])
        else:
            raise NodeError(f"unknown node command {op!r} from rank 0")


def run_node(config: WorkerConfig, env: NodeEnv) -> int:
    """Run this process's rank of a torchrun worker (``config.device`` already resolved)."""
    for handler in logging.getLogger().handlers:  # the ranks share one stderr: say whose line it is
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [rank{env.rank}] %(name)s %(message)s")
        )
    node = Node(env, torch.device(config.device), timeout_s=config.dist_timeout_s)
    try:
        return lead(config, node) if node.is_leader else follow(config, node)
    finally:
        node.close()
