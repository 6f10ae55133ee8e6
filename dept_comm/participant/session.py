"""The round protocol as a participant speaks it: pull, encode + push + commit, wait, recover.

``Session`` is what :class:`~dept_comm.participant.Participant` (a user's model) and DEPT's
``dept_worker.loop.Worker`` share: the joined client, the replica, the error-feedback encoder,
and what to do when the server refuses an update (stale, conflict, outlier, unknown worker,
round not open) or a replica diverges from the server's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import torch

from dept_comm.codecs import Codec, get_codec
from dept_comm.codecs.gpu import DeviceErrorFeedback, make_feedback
from dept_comm.digest import Group
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
from dept_comm.names import default_group_of
from dept_comm.pb import service_pb2
from dept_comm.pipeline import PipelinedUpload
from dept_comm.streaming import PULL_LIMITS, PullReceiver, StreamOpenInfo, encode_stream

from .client import ServerClient
from .replica import Replica

__all__ = ["FINISHED", "MAX_DIVERGED", "Session"]

logger = logging.getLogger(__name__)
FINISHED = service_pb2.RUN_STATE_FINISHED
MAX_DIVERGED = 3  # refusals of a diverged replica's update (each followed by a full pull) before giving up


class Session:
    """A joined participant's side of the round protocol (see the module docstring).

    Subclasses supply the join request (``make_join_request``, for rejoining) and may hook into
    pulls (``row_ids``, ``check_pull``, ``on_pulled``) and refusals (``on_refused``).
    """

    def __init__(self, client: ServerClient, replica: Replica, *, device: str | torch.device) -> None:
        self.client = client
        self.replica = replica
        self.device = torch.device(device)
        self.worker_id = ""
        self.info = service_pb2.RoundInfo()
        self.run_info: dict[str, Any] = {}
        self._raw = get_codec("raw")
        # Each update tensor's accounting group: it must be the server's (a differing header is
        # refused). The generic server's default; DEPT's worker sets dept_comm.names.group_of.
        self.group_of: Callable[[str], Group] = default_group_of()
        self.codec_up: Codec = self._raw
        self.feedback = make_feedback(self.codec_up, self.device)
        # (round, the upload's open and chunks, its CommitUpdate; the commit is filled in once encoded)
        self.pending: tuple[int, Sequence[StreamItem], service_pb2.CommitUpdateRequest] | None = None
        # Encode the update on a background thread while it is sent (dept_comm.pipeline); False:
        # encode all of it first, then send.
        self.pipelined = True
        self.comm_s = {"pull_s": 0.0, "push_s": 0.0}  # this round's pull and push seconds (its log line)
        self._diverged = 0  # stale refusals in a row while the server held our version
        self._beat_s = 10.0
        self._stop_beats = threading.Event()
        self._beats: threading.Thread | None = None

    def joined(self, reply: service_pb2.JoinReply) -> None:
        """Take a join reply: the worker id, the round, the run's description and the upload codec
        (int8/int4 on CUDA: quantised on the GPU)."""
        self.worker_id, self.info = reply.worker_id, reply.round
        self.run_info = json.loads(reply.run_config_json) if reply.run_config_json else {}
        self.codec_up = get_codec(reply.codec_up) if reply.codec_up else self._raw
        self.feedback = make_feedback(self.codec_up, self.device)
        self._beat_s = reply.heartbeat_interval_ms / 1000 if reply.heartbeat_interval_ms else 10.0

    # -- hooks -------------------------------------------------------------------------------
    def make_join_request(self) -> service_pb2.JoinRequest:
        """The request this participant joins (and rejoins) with."""
        raise NotImplementedError

    def row_ids(self) -> list[int]:
        """The rows of a row-subset tensor (``emb.rows``) this participant pulls; none by default."""
        return []

    def check_pull(self, info: StreamOpenInfo, tensors: Mapping[str, torch.Tensor]) -> None:
        """Called with each received pull before it is applied; may raise."""

    def on_pulled(self) -> None:
        """Called after each verified pull."""

    def on_refused(self) -> None:
        """Called when the server refused this round's update, or the participant is not in it."""

    # -- pull --------------------------------------------------------------------------------
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
                row_ids=self.row_ids(),
            )
            # On a GPU, int8/int4 updates are dequantised there: the host copies packed bytes only.
            # Each tensor is decoded as its last chunk arrives; the digests are verified at the end.
            receiver = PullReceiver(limits=PULL_LIMITS, device=self.replica.device)
            self.client.pull(request, sink=receiver)
            info, tensors = receiver.result()
            self.check_pull(info, tensors)
            try:
                self.replica.apply_pull(info, tensors)
                self.on_pulled()
                return
            except CommitMismatchError as err:
                logger.warning("pull did not verify (%s); pulling the full body", err)
        raise CommitMismatchError("a full pull did not verify against the server's digest")

    def pull_after_run(self) -> None:
        """The final pull: joining again first if the server restarted after the last round."""
        try:
            self.pull()
        except (NotFoundError, UnauthenticatedError):
            self.rejoin()
            self.pull()

    # -- push --------------------------------------------------------------------------------
    def encode_update(self, round_idx: int) -> list[StreamItem]:
        """This round's update (the replica's delta) as an upload stream, float tensors through
        the error-feedback encoder with ``codec_up``, index tensors raw."""
        return list(self.update_stream(round_idx))

    def update_stream(self, round_idx: int) -> Iterator[StreamItem]:
        """``encode_update`` as a lazy stream: the delta and the open are taken now, each tensor
        is encoded (and its error feedback updated) as the stream is consumed."""
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
            return self.codec_up if t.is_floating_point() else self._raw

        on_device = isinstance(self.feedback, DeviceErrorFeedback)  # quantised where the delta lives

        def encoder(name: str, t: torch.Tensor, codec: Codec) -> bytes:
            if codec is self.codec_up:
                return self.feedback.encode(name, t if on_device else t.cpu())
            return codec.encode(t.cpu())

        groups = {k: self.group_of(k) for k in delta}
        return encode_stream(delta, open_info=open_info, codec=codec_for, groups=groups, encoder=encoder)

    def prepare_update(
        self,
        round_idx: int,
        *,
        loss: float = float("nan"),
        tokens: int = 0,
        metrics: Mapping[str, float] | None = None,
    ) -> Sequence[StreamItem]:
        """Encode this round's update (open and chunks) and its commit; they become ``pending``
        (what ``push`` sends). ``pipelined``: encoding goes on in the background while ``push``
        sends (a :class:`~dept_comm.pipeline.PipelinedUpload`); ``finish_encoding`` waits for it."""
        commit = service_pb2.CommitUpdateRequest(
            worker_id=self.worker_id,
            round_idx=round_idx,
            train_loss=loss,
            num_tokens=tokens,
            metrics=dict(metrics or {}),
        )
        messages: Sequence[StreamItem]
        if self.pipelined:
            messages = PipelinedUpload(self.update_stream(round_idx))
        else:
            encoded = self.encode_update(round_idx)
            commit.commit.CopyFrom(as_message(encoded[-1]).commit)
            messages = encoded[:-1]
        self.pending = (round_idx, messages, commit)
        return messages

    def finish_encoding(self) -> None:
        """Wait until the pending update is encoded (its error feedback state is then this
        round's, e.g. to save it); raises the encoder's error."""
        if self.pending is not None and isinstance(self.pending[1], PipelinedUpload):
            self.pending[1].wait()

    def push(self) -> None:
        """Send the pending upload (resumable) and commit it."""
        assert self.pending is not None
        _, messages, commit = self.pending
        t0 = time.monotonic()
        try:
            receipt = self.client.push(messages)
            if receipt.missing_seqs:
                raise CommitMismatchError(
                    f"server is missing chunks {list(receipt.missing_seqs)[:8]} after a push"
                )
            if isinstance(messages, PipelinedUpload):
                commit.commit.CopyFrom(messages.commit)  # known once the last tensor was encoded
            self.client.commit(commit)
        finally:
            self.comm_s["push_s"] += time.monotonic() - t0

    # -- rounds ------------------------------------------------------------------------------
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

    def _where_now(self) -> None:
        self.info = self.client.heartbeat(service_pb2.HeartbeatRequest(worker_id=self.worker_id)).round

    def play_round(self, contribute: Callable[[int], None]) -> bool:
        """Take part in the current round: ``contribute(round_idx)`` (which pushes and commits) if
        this participant is a member and has not committed yet, then wait for the round to close.

        A refusal is handled here: stale or conflicting updates re-ask where the round is (a
        diverged replica's next pull is full, ``MAX_DIVERGED`` times at most), an outlier or a
        round this participant was not admitted to waits for the next round, an unknown worker
        or session joins again. Returns False once the server says the run finished.
        """
        round_idx = self.info.round_idx
        try:
            if self.info.admitted_round > round_idx:
                self.wait_for_next_round(round_idx)
                return True
            if not self.info.committed:
                contribute(round_idx)
            self.wait_for_close(round_idx)
        except (StaleRoundError, ConflictError) as err:
            self.on_refused()
            # Stale: the model moved on. Conflict: this upload was dropped (superseded or
            # expired) or another one already counted. Either way, ask where the round is.
            logger.warning("round=%d update refused (%s); re-pulling", round_idx, err)
            self.pending = None
            self._where_now()
            if isinstance(err, StaleRoundError):
                self._after_stale(round_idx)
        except OutlierUpdateError as err:
            self.on_refused()
            # The server's norm guard: this round goes on without us; we take part in the next.
            logger.warning("round=%d update refused by the server (%s); skipping this round", round_idx, err)
            self.wait_for_next_round(round_idx)
        except (NotFoundError, UnauthenticatedError) as err:
            self.on_refused()
            logger.warning("server does not know us or our session (restarted?): %s; joining again", err)
            self.rejoin()
        except RoundNotOpenError as err:
            self.on_refused()
            # Not admitted to the open round (it had no room or was closing): the next one.
            self._where_now()
            if self.info.round_idx == round_idx:
                logger.warning("round=%d: %s", round_idx, err)
                self.wait_for_next_round(round_idx)
        except RunFinishedError:
            return False
        return True

    # -- membership --------------------------------------------------------------------------
    def rejoin(self) -> None:
        """Join again (the server restarted or forgot this participant); keeps the replica."""
        reply = self.client.join(self.make_join_request())
        self.worker_id, self.info = reply.worker_id, reply.round

    def _heartbeat_loop(self) -> None:
        while not self._stop_beats.wait(self._beat_s):
            try:
                self.client.heartbeat(service_pb2.HeartbeatRequest(worker_id=self.worker_id))
            except (grpc.RpcError, DeptError) as err:  # a missed beat is logged; the main loop owns failures
                logger.debug("heartbeat failed: %s", err)

    def start_heartbeats(self) -> None:
        """Heartbeat in a daemon thread at the server's interval until ``stop_heartbeats``."""
        self._stop_beats.clear()
        self._beats = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._beats.start()

    def stop_heartbeats(self, timeout_s: float) -> None:
        """Stop the heartbeat thread (waiting up to ``timeout_s`` for a call in flight)."""
        self._stop_beats.set()
        if self._beats is not None:
            # A daemon thread still inside a gRPC call at interpreter exit aborts the process.
            self._beats.join(timeout=timeout_s)
            self._beats = None

    def leave(self, reason: str, metrics: Mapping[str, float] | None = None) -> None:
        """Tell the server this participant leaves (failures are logged, not raised)."""
        self.client.leave(
            service_pb2.LeaveRequest(worker_id=self.worker_id, reason=reason, metrics=dict(metrics or {}))
        )
