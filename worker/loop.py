"""The worker's round loop: join, pull, evaluate, train, push + commit, wait; until the run ends.

The round protocol itself (pulls, uploads, refusals, heartbeats) is
:class:`dept_comm.participant.Session`; ``Worker`` adds DEPT's model, evaluation, training,
state and ``--overlap``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from dept_comm.codecs import codec_names
from dept_comm.names import group_of
from dept_comm.participant import ServerClient, Session, WorkerState
from dept_comm.participant.client import stream_idle_for
from dept_comm.participant.session import FINISHED, MAX_DIVERGED
from dept_comm.pb import service_pb2
from dept_comm.progress import IntervalGate
from dept_model import Variant, evaluate
from dept_model.data import eval_batches
from dept_model.tokenizer import vocab_digest

from .config import WorkerConfig
from .device import resolve_device
from .dist import single_process_position
from .overlap import Overlap, OverlapReplica
from .setup import WorkerSetup, build_setup, resolve_tokenizer
from .view import DeptReplica

__all__ = ["FINISHED", "MAX_DIVERGED", "Worker", "connect", "run"]

logger = logging.getLogger(__name__)


class Worker(Session):
    """One data source's trainer, speaking the round protocol with dept-server."""

    replica: DeptReplica

    def __init__(
        self,
        config: WorkerConfig,
        client: ServerClient,
        setup: WorkerSetup,
        reply: service_pb2.JoinReply,
        store: WorkerState,
    ) -> None:
        self.config = config
        self.setup = setup
        self.store = store
        variant = Variant(json.loads(reply.run_config_json)["variant"])
        replica = (OverlapReplica if config.overlap else DeptReplica)(setup.model, str(variant))
        super().__init__(client, replica, device=config.device)
        self.group_of = group_of  # DEPT's accounting groups: body.* is the body, emb.* the embeddings
        self.joined(reply)
        self.variant = variant
        self.overlap = Overlap(self) if config.overlap else None  # --overlap: worker/overlap.py
        self.last_loss = float("nan")
        self.eval_s = 0.0  # the last evaluation's seconds (logged with each round)
        self._restore()

    # -- persistence -------------------------------------------------------------------------
    def _restore(self) -> None:
        saved = self.store.load()
        if saved is None:
            return
        position = single_process_position(saved["data"], self.store.dir)  # also a 1-rank node's
        self.setup.trainer.load(saved["trainer_path"])
        self.feedback.load_state_dict(saved["feedback"])
        self.setup.train_batches.load_state_dict(position)

    def _save(self, round_idx: int) -> None:
        self.store.save(
            round_idx=round_idx,
            trainer=self.setup.trainer,
            feedback=self.feedback.state_dict(),
            data=self.setup.train_batches.state_dict(),
        )

    # -- the session's hooks -----------------------------------------------------------------
    def make_join_request(self) -> service_pb2.JoinRequest:
        return self.join_request(self.config, self.setup.vocab_digest)

    def row_ids(self) -> list[int]:
        if self.variant != Variant.TRIM:
            return []
        return [int(i) for i in self.setup.model.embeddings.global_ids().tolist()]

    def on_pulled(self) -> None:
        self.store.record_digest(
            self.replica.version, self.replica.body_digest().hex(), self.replica.digest().hex()
        )

    def on_refused(self) -> None:
        self._drop_overlap()

    # -- one round ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the model as it is; ``eval_s`` holds the seconds they took."""
        t0 = time.monotonic()
        batches = eval_batches(
            self.setup.val_tokens,
            seq_len=self.config.seq_len,
            batch_size=self.config.batch_size,
            max_batches=self.config.eval_batches,
        )
        metrics = {
            k: float(v) for k, v in evaluate(self.setup.model, batches, self.setup.byte_lengths).items()
        }
        self.eval_s = time.monotonic() - t0
        return metrics

    def train(self) -> tuple[float, int]:
        device = torch.device(self.config.device)
        losses = []
        gate = IntervalGate(self.config.progress_interval_s)
        for k in range(1, self.config.inner_steps + 1):
            x, y = self.setup.train_batches.next_batch()
            losses.append(self.setup.trainer.step(x.to(device), y.to(device)))
            if gate.due():  # the running loss: the mean of this round's steps so far
                logger.info("inner_step step=%d/%d loss=%.4f", k, self.config.inner_steps, sum(losses) / k)
        self.last_loss = sum(losses) / len(losses)
        return self.last_loss, self.config.inner_steps * self.config.batch_size * self.config.seq_len

    def do_round(self, round_idx: int | None = None) -> None:
        round_idx = self.info.round_idx if round_idx is None else round_idx
        started = time.monotonic()
        self.comm_s = {"pull_s": 0.0, "push_s": 0.0}
        if self.overlap is not None:
            loss, tokens, metrics, train_s = self.overlap.round()
        else:
            self.pull()
            metrics = self.evaluate()
            t0 = time.monotonic()
            loss, tokens = self.train()
            train_s = time.monotonic() - t0
        eval_s = self.eval_s  # now: with overlap, the next round's evaluation starts below
        messages = self.prepare_update(round_idx, loss=loss, tokens=tokens, metrics=metrics)
        if self.overlap is not None and self.overlap.has_next(round_idx):
            self.finish_encoding()  # the saved error feedback is this round's whole update's
            self._save(round_idx)  # before the next round's steps move the model and the data
            self.overlap.train_ahead()
            self.push()
        else:
            self.push()
            self._save(round_idx)
        up = sum(m.ByteSize() for m in messages)
        logger.info(
            "round=%d source=%s train_loss=%.4f val_ppl=%.2f up_payload_bytes=%d seconds=%.1f "
            "train_s=%.3f pull_s=%.3f push_s=%.3f eval_s=%.3f",
            round_idx,
            self.config.source,
            loss,
            metrics.get("ppl", float("nan")),
            up,
            time.monotonic() - started,
            train_s,
            self.comm_s["pull_s"],
            self.comm_s["push_s"],
            eval_s,
        )

    def _drop_overlap(self) -> None:
        if self.overlap is not None:
            self.overlap.drop()

    @staticmethod
    def join_request(config: WorkerConfig, digest_hex: str) -> service_pb2.JoinRequest:
        return service_pb2.JoinRequest(
            source_id=config.source,
            attributes={"dept.vocab_digest": digest_hex},
            attributes_schema="dept/1",
            codecs=codec_names(),
            worker_name=config.worker_name,
        )

    def run(self) -> int:
        self.start_heartbeats()
        try:
            while self.info.state != FINISHED:
                if not self.play_round(self.do_round):
                    break
            self._drop_overlap()
            self.pull_after_run()
            final = self.evaluate()
            logger.info(
                "finished source=%s final_val_ppl=%.2f", self.config.source, final.get("ppl", float("nan"))
            )
            self.leave("finished", final)
            return 0
        finally:
            self._drop_overlap()
            self.stop_heartbeats(self.config.rpc_timeout_s)


def connect(config: WorkerConfig) -> ServerClient:
    """A client for ``config.server`` with the worker's token, TLS, RPC timeout and stall guard."""
    return ServerClient(
        config.server,
        token=config.token,
        timeout_s=config.rpc_timeout_s,
        retry_for_s=config.reconnect_timeout_s,
        credentials=config.channel_credentials(),
        server_name=config.tls_server_name,
        stream_idle_s=stream_idle_for(config.min_bandwidth_mbps),
        progress_interval_s=config.progress_interval_s,
        streams=config.streams,
    )


def run(config: WorkerConfig) -> int:
    """Join the server, build the model for its variant, and train until the run ends."""
    config = dataclasses.replace(config, device=str(resolve_device(config.device)))
    state_dir = config.state_dir or Path(tempfile.mkdtemp(prefix=f"dept-worker-{config.source}-"))
    store = WorkerState(state_dir)
    tokenizer = resolve_tokenizer(config, state_dir)
    client = connect(config)
    digest = vocab_digest(tokenizer)
    try:
        reply = client.join(Worker.join_request(config, digest))
        setup = build_setup(config, json.loads(reply.run_config_json), tokenizer, digest)
        return Worker(config, client, setup, reply, store).run()
    finally:
        client.close()
