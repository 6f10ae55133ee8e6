"""The worker's round loop: join, pull, evaluate, train, push + commit, wait; until the run ends."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import torch

from dept_comm.codecs import Codec, codec_names, get_codec
from dept_comm.codecs.gpu import DeviceErrorFeedback, make_feedback
from dept_comm.errors import (
    CommitMismatchError,
    ConflictError,
    DeptError,
    NotFoundError,
    OutlierUpdateError,
    RoundNotOpenError,
    RunFinishedError,
    StaleRoundError,
    UnauthenticatedError,
)
from dept_comm.frames import StreamItem, as_message
from dept_comm.names import EMB_IDS, group_of
from dept_comm.pb import service_pb2
from dept_comm.progress import IntervalGate
from dept_comm.streaming import PULL_LIMITS, StreamOpenInfo, encode_stream, receive_stream
from dept_model import Variant, evaluate
from dept_model.data import eval_batches
from dept_model.tokenizer import vocab_digest

from .client import ServerClient, stream_idle_for
from .config import WorkerConfig
from .device import resolve_device
from .overlap import Overlap, OverlapReplica
from .persist import WorkerState, single_process_position
from .replica import Replica
from .setup import WorkerSetup, build_setup, resolve_tokenizer

logger = logging.getLogger(__name__)
FINISHED = service_pb2.RUN_STATE_FINISHED
MAX_DIVERGED = 3  # refusals of a diverged replica's update (each followed by a full pull) before giving up


class Worker:
    """One data source's trainer, speaking the round protocol with dept-server."""

    def __init__(
        self,
        config: WorkerConfig,
        client: ServerClient,
        setup: WorkerSetup,
        reply: service_pb2.JoinReply,
        store: WorkerState,
    ) -> None:
        self.config = config
        self.client = client
        self.setup = setup
        self.store = store
        self.run_info: dict[str, Any] = json.loads(reply.run_config_json)
        self.variant = Variant(self.run_info["variant"])
        self.worker_id = reply.worker_id
        self.info = reply.round
        self.codec_up: Codec = get_codec(reply.codec_up)
        self._raw = get_codec("raw")
        self.feedback = make_feedback(self.codec_up, config.device)  # int8/int4 on CUDA: quantised on the GPU
        self.replica = (OverlapReplica if config.overlap else Replica)(setup.model, str(self.variant))
        self.overlap = Overlap(self) if config.overlap else None  # --overlap: worker/overlap.py
        self.pending: tuple[int, list[StreamItem], service_pb2.CommitUpdateRequest] | None = None
        self.last_loss = float("nan")
        self.comm_s = {"pull_s": 0.0, "push_s": 0.0}  # this round's pull and push seconds (its log line)
        self._diverged = 0  # stale refusals in a row while the server held our version
        self._beat_s = reply.heartbeat_interval_ms / 1000 if reply.heartbeat_interval_ms else 10.0
        self._stop_beats = threading.Event()
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

    # -- one round ---------------------------------------------------------------------------
    def _row_ids(self) -> list[int]:
        if self.variant != Variant.TRIM:
            return []
        return [int(i) for i in self.setup.model.embeddings.global_ids().tolist()]

    def pull(self, full: bool = False) -> None:
        """Bring the replica to the server's current version, verifying its digest."""
        t0 = time.monotonic()
        try:
            self._pull(full)
        finally:
            self.comm_s["pull_s"] += time.monotonic() - t0

    def _pull(self, full: bool) -> None:
        for attempt in (0, 1):
            request = service_pb2.PullRequest(
                worker_id=self.worker_id,
                round_idx=self.info.round_idx,
                have_version=max(self.replica.version, 0),
                full=full or attempt == 1 or self.replica.version < 0,
                row_ids=self._row_ids(),
            )
            # On a GPU, int8/int4 updates are dequantised there: the host copies packed bytes only.
            info, tensors = receive_stream(
                self.client.pull(request), limits=PULL_LIMITS, device=self.replica.device
            )
            try:
                self.replica.apply_pull(info, tensors)
                self.store.record_digest(
                    self.replica.version, self.replica.body_digest().hex(), self.replica.digest().hex()
                )
                return
            except CommitMismatchError as err:
                logger.warning("pull did not verify (%s); pulling the full body", err)
        raise CommitMismatchError("a full pull did not verify against the server's digest")

    def evaluate(self) -> dict[str, float]:
        batches = eval_batches(
            self.setup.val_tokens,
            seq_len=self.config.seq_len,
            batch_size=self.config.batch_size,
            max_batches=self.config.eval_batches,
        )
        return {k: float(v) for k, v in evaluate(self.setup.model, batches, self.setup.byte_lengths).items()}

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

    def _encode_update(self, round_idx: int) -> list[StreamItem]:
        delta = self.replica.delta()
        open_info = StreamOpenInfo(
            upload_id=f"{self.worker_id}-{round_idx}-{uuid.uuid4().hex[:12]}",
            sender_id=self.worker_id,
            round_idx=round_idx,
            base_version=self.replica.version,
            base_digest=self.replica.digest(),
            target_version=0,
            target_digest=b"",
            is_delta=True,
        )

        def codec_for(name: str, t: torch.Tensor) -> Codec:
            return self._raw if name == EMB_IDS else self.codec_up

        on_device = isinstance(self.feedback, DeviceErrorFeedback)  # quantised where the delta lives

        def encoder(name: str, t: torch.Tensor, codec: Codec) -> bytes:
            if codec is self.codec_up:
                return self.feedback.encode(name, t if on_device else t.cpu())
            return codec.encode(t.cpu())

        groups = {k: group_of(k) for k in delta}
        return list(
            encode_stream(delta, open_info=open_info, codec=codec_for, groups=groups, encoder=encoder)
        )

    def push(self) -> None:
        assert self.pending is not None
        _, messages, commit = self.pending
        t0 = time.monotonic()
        try:
            receipt = self.client.push(messages[:-1])
            if receipt.missing_seqs:
                raise CommitMismatchError(
                    f"server is missing chunks {list(receipt.missing_seqs)[:8]} after a push"
                )
            self.client.commit(commit)
        finally:
            self.comm_s["push_s"] += time.monotonic() - t0

    def do_round(self) -> None:
        round_idx = self.info.round_idx
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
        messages = self._encode_update(round_idx)
        commit = service_pb2.CommitUpdateRequest(
            commit=as_message(messages[-1]).commit,
            worker_id=self.worker_id,
            round_idx=round_idx,
            train_loss=loss,
            num_tokens=tokens,
            metrics=metrics,
        )
        self.pending = (round_idx, messages, commit)
        if self.overlap is not None and self.overlap.has_next(round_idx):
            self._save(round_idx)  # before the next round's steps move the model and the data
            self.overlap.train_ahead()
            self.push()
        else:
            self.push()
            self._save(round_idx)
        up = sum(m.ByteSize() for m in messages)
        logger.info(
            "round=%d source=%s train_loss=%.4f val_ppl=%.2f up_payload_bytes=%d seconds=%.1f "
            "train_s=%.3f pull_s=%.3f push_s=%.3f",
            round_idx,
            self.config.source,
            loss,
            metrics.get("ppl", float("nan")),
            up,
            time.monotonic() - started,
            train_s,
            self.comm_s["pull_s"],
            self.comm_s["push_s"],
        )

    def wait_for_close(self, round_idx: int) -> None:
        """Wait (on the WatchRounds stream, no polling) until round ``round_idx`` closed; re-push if
        the server lost our commit (restart), train the round if it is ours and nothing is pending."""
        for info in self.client.watch_rounds(self.worker_id):
            self.info = info
            if info.state == FINISHED or info.round_idx > round_idx:
                return
            if info.admitted_round > info.round_idx:
                continue  # not a member of this round (no room, or excused): wait for the next one
            if not info.committed:
                if self.pending is not None and self.pending[0] == round_idx:
                    logger.warning("server lost our commit for round=%d (restart?); pushing again", round_idx)
                    self.push()
                else:
                    return  # nothing to resend: train this round again

    def wait_for_next_round(self, round_idx: int) -> None:
        """Not a member of round ``round_idx``: wait for the next one without training."""
        self.pending = None
        logger.info(
            "round=%d is not waiting for this worker (no room, or it is closing); it takes part from round %d",
            round_idx,
            round_idx + 1,
        )
        for info in self.client.watch_rounds(self.worker_id):
            self.info = info
            if info.state == FINISHED or info.round_idx > round_idx:
                return

    def _after_stale(self, round_idx: int) -> None:
        """A stale refusal while the server still holds the version this replica trained from
        means the replica's shared state differs from the server's: pull the whole body next.
        Refused that way ``MAX_DIVERGED`` times in a row, the replica cannot be trusted: stop.
        """
        if self.info.version != self.replica.version or self.info.round_idx != round_idx:
            self._diverged = 0  # the model moved on: an ordinary stale update
            return
        self._diverged += 1
        if self._diverged >= MAX_DIVERGED:
            raise CommitMismatchError(
                f"round={round_idx}: the server refused {self._diverged} updates in a row as trained "
                "from a replica that differs from its own, full pulls did not help; stopping"
            )
        self.replica.version = -1  # the next pull is a full one

    def _drop_overlap(self) -> None:
        if self.overlap is not None:
            self.overlap.drop()

    def _heartbeats(self) -> None:
        while not self._stop_beats.wait(self._beat_s):
            try:
                self.client.heartbeat(service_pb2.HeartbeatRequest(worker_id=self.worker_id))
            except (grpc.RpcError, DeptError) as err:  # a missed beat is logged; the main loop owns failures
                logger.debug("heartbeat failed: %s", err)

    def rejoin(self) -> None:
        reply = self.client.join(self.join_request(self.config, self.setup.vocab_digest))
        self.worker_id, self.info = reply.worker_id, reply.round

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
        beats = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beats.start()
        try:
            while self.info.state != FINISHED:
                round_idx = self.info.round_idx
                try:
                    if self.info.admitted_round > round_idx:
                        self.wait_for_next_round(round_idx)
                        continue
                    if not self.info.committed:
                        self.do_round()
                    self.wait_for_close(round_idx)
                except (StaleRoundError, ConflictError) as err:
                    self._drop_overlap()
                    # Stale: the model moved on. Conflict: this upload was dropped (superseded or
                    # expired) or another one already counted. Either way, ask where the round is.
                    logger.warning("round=%d update refused (%s); re-pulling", round_idx, err)
                    self.pending = None
                    self.info = self.client.heartbeat(
                        service_pb2.HeartbeatRequest(worker_id=self.worker_id)
                    ).round
                    if isinstance(err, StaleRoundError):
                        self._after_stale(round_idx)
                except OutlierUpdateError as err:
                    self._drop_overlap()
                    # The server's norm guard: this round goes on without us; we take part in the next.
                    logger.warning(
                        "round=%d update refused by the server (%s); skipping this round", round_idx, err
                    )
                    self.wait_for_next_round(round_idx)
                except (NotFoundError, UnauthenticatedError) as err:
                    self._drop_overlap()
                    logger.warning(
                        "server does not know us or our session (restarted?): %s; joining again", err
                    )
                    self.rejoin()
                except RoundNotOpenError as err:
                    self._drop_overlap()
                    # Not admitted to the open round (it had no room or was closing): the next one.
                    self.info = self.client.heartbeat(
                        service_pb2.HeartbeatRequest(worker_id=self.worker_id)
                    ).round
                    if self.info.round_idx == round_idx:
                        logger.warning("round=%d: %s", round_idx, err)
                        self.wait_for_next_round(round_idx)
                except RunFinishedError:
                    break
            self._drop_overlap()
            try:
                self.pull()
            except (NotFoundError, UnauthenticatedError):  # the server restarted after the last round
                self.rejoin()
                self.pull()
            final = self.evaluate()
            logger.info(
                "finished source=%s final_val_ppl=%.2f", self.config.source, final.get("ppl", float("nan"))
            )
            self.client.leave(
                service_pb2.LeaveRequest(worker_id=self.worker_id, reason="finished", metrics=final)
            )
            return 0
        finally:
            self._drop_overlap()
            self._stop_beats.set()
            # A daemon thread still inside a gRPC call at interpreter exit aborts the process.
            beats.join(timeout=self.config.rpc_timeout_s)


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
