"""A real dept-server in this process, and a worker's first steps against it, for integration tests.

Uploads are encoded as dept-worker encodes them (dept_comm/participant/session.py ``encode_update``): every float
tensor with the server's ``codec_up`` through one :class:`ErrorFeedback` per worker, ``emb.ids``
raw. :func:`worker_upload` also returns what the server will decode, so tests can check the
server's result against it (a server that fell back to another codec would not match).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from dept_comm.channel import open_channel
from dept_comm.codecs import Codec, get_codec
from dept_comm.codecs.feedback import ErrorFeedback
from dept_comm.frames import StreamItem, WireItem, as_message, chunk_of
from dept_comm.names import EMB_IDS, group_of
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.pull_resume import PullProgress
from dept_comm.server.run import RunningServer
from dept_comm.service import ParameterServerStub
from dept_comm.streaming import PULL_LIMITS, StreamConfig, StreamOpenInfo, encode_stream, receive_stream
from dept_server.config import ServerConfig
from dept_server.serve import start_dept_server
from tests.e2e.harness import wait_for
from tests.faults.proxy import TcpProxy


@contextmanager
def serving(tmp_path: Path, **overrides: object) -> Iterator[RunningServer]:
    """A spec/tiny server on 127.0.0.1:0 with a checkpoint dir; ``overrides`` replace any setting."""
    settings: dict[str, object] = {
        "port": 0, "rounds": 2, "workers": 1, "variant": "spec", "model": "tiny",
        "codec_up": "int8", "codec_down": "int8", "checkpoint_dir": tmp_path / "ckpt",
    }  # fmt: skip
    server = start_dept_server(ServerConfig(**(settings | overrides)))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop(None)


@dataclass
class Joined:
    """A worker that joined and pulled: its id, the join reply, the pull's open info and the body."""

    worker_id: str
    reply: service_pb2.JoinReply
    info: StreamOpenInfo
    body: dict[str, torch.Tensor]

    @property
    def session(self) -> str:
        """The session credential Join issued to this worker."""
        return self.reply.session

    def metadata(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        """What this worker's calls carry: the bearer token (if any) and its session credential."""
        auth = (("authorization", f"Bearer {token}"),) if token else ()
        return (*auth, ("dept-session", self.session))

    def sender(self) -> WorkerSender:
        """An encoder of this worker's uploads (one error-feedback state, as a worker keeps)."""
        return WorkerSender(self.worker_id, self.reply.codec_up)


def join_and_pull(
    client: ServerClient, source: str = "sw", *, vocab_digest: str = "", row_ids: Sequence[int] = ()
) -> Joined:
    """Join as ``source`` and pull the whole body (for trim: with the rows of ``row_ids``;
    glob and trim need the global tokenizer's ``vocab_digest``, hex, at join)."""
    join = service_pb2.JoinRequest(
        source_id=source,
        worker_name=source,
        attributes={"dept.vocab_digest": vocab_digest},
        attributes_schema="dept/1",
    )
    reply = client.join(join)
    request = service_pb2.PullRequest(worker_id=reply.worker_id, full=True, row_ids=list(row_ids))
    pulled = client.pull(request)
    info, body = receive_stream(pulled, limits=PULL_LIMITS)
    return Joined(reply.worker_id, reply, info, body)


def seqs(items: Sequence[WireItem]) -> list[int]:
    """The chunk seqs of a stream's messages, in order (open and commit left out)."""
    return [c.seq for c in (chunk_of(m) for m in items) if c is not None]


@dataclass
class RawPeer:
    """A joined worker with both a ``ServerClient`` and a bare stub on its own channel, for tests
    that shape requests (stripes, resumes, partial pushes) the client would not send."""

    server: RunningServer
    client: ServerClient
    stub: ParameterServerStub
    joined: Joined


@contextmanager
def raw_peer(tmp_path: Path, *, streams: int = 1, **overrides: object) -> Iterator[RawPeer]:
    """``serving(tmp_path, **overrides)``, one worker joined and pulled, and a raw stub beside it."""
    with serving(tmp_path, **overrides) as server:
        target = f"127.0.0.1:{server.port}"
        client = ServerClient(target, timeout_s=20, streams=streams)
        channel = open_channel(target)
        try:
            yield RawPeer(server, client, ParameterServerStub(channel), join_and_pull(client))
        finally:
            channel.close()
            client.close()


def pull_until(peer: RawPeer, request: service_pb2.PullRequest, progress: PullProgress, seq: int) -> None:
    """Pull until chunk ``seq`` arrived (into ``progress``), then cancel the call: a cut pull."""
    call = peer.stub.PullBody(request, metadata=peer.joined.metadata())
    for msg in call:
        progress.add(msg)
        chunk = chunk_of(msg)
        if chunk is not None and chunk.seq == seq:
            call.cancel()
            break


def random_delta(body: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """Random normal deltas (which no lossy codec encodes exactly) for every float tensor of the
    body; integer tensors (``emb.ids``) are sent as they are, as a worker sends its row ids."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen) * scale if v.is_floating_point() else v.clone()
        for k, v in body.items()
    }


@dataclass
class Upload:
    """An encoded upload (open, chunks, commit last) and the values the server decodes from it."""

    messages: list[StreamItem]
    decoded: dict[str, torch.Tensor]

    @property
    def upload_id(self) -> str:
        return as_message(self.messages[0]).open.upload_id

    def commit_request(self, worker_id: str, round_idx: int) -> service_pb2.CommitUpdateRequest:
        return service_pb2.CommitUpdateRequest(
            commit=as_message(self.messages[-1]).commit, worker_id=worker_id, round_idx=round_idx
        )


class WorkerSender:
    """Encodes uploads like dept-worker: ``codec_up`` with error feedback, ``emb.ids`` raw."""

    def __init__(self, worker_id: str, codec_up: str) -> None:
        self.worker_id = worker_id
        self.codec: Codec = get_codec(codec_up)
        self.raw: Codec = get_codec("raw")
        self.feedback = ErrorFeedback(self.codec)

    def upload(
        self,
        delta: dict[str, torch.Tensor],
        *,
        info: StreamOpenInfo,
        round_idx: int = 0,
        chunk_bytes: int = 1 << 20,
    ) -> Upload:
        """Encode ``delta`` as the update for ``round_idx``, trained from the pull ``info`` describes."""
        open_info = StreamOpenInfo(
            upload_id=f"u-{uuid.uuid4().hex}",
            sender_id=self.worker_id,
            round_idx=round_idx,
            base_version=info.target_version,
            base_digest=info.target_digest,
            is_delta=True,
        )
        decoded: dict[str, torch.Tensor] = {}

        def codec_for(name: str, t: torch.Tensor) -> Codec:
            return self.raw if name == EMB_IDS else self.codec

        def encoder(name: str, t: torch.Tensor, codec: Codec) -> bytes:
            if codec is not self.codec:
                decoded[name] = t.clone()
                return codec.encode(t)
            payload, values = self.feedback.encode_with_decoded(name, t)
            decoded[name] = values.clone()
            return payload

        messages = list(
            encode_stream(
                delta,
                open_info=open_info,
                codec=codec_for,
                groups={k: group_of(k) for k in delta},
                config=StreamConfig(chunk_bytes=chunk_bytes),
                encoder=encoder,
            )
        )
        return Upload(messages, decoded)


def worker_upload(joined: Joined, *, seed: int = 0, chunk_bytes: int = 1 << 20, round_idx: int = 0) -> Upload:
    """A fresh worker's first upload: random normal deltas from the pulled body, as it sends them."""
    return joined.sender().upload(
        random_delta(joined.body, seed), info=joined.info, round_idx=round_idx, chunk_bytes=chunk_bytes
    )


def reset_at(
    items: Iterable[StreamItem], proxy: TcpProxy, at: int, ready: Callable[[], bool], what: str
) -> Iterator[StreamItem]:
    """``items``, resetting every connection ``proxy`` carries before item ``at`` once ``ready()``
    (waiting for ``what``): a link dropped mid-upload, after the server has something to keep."""
    for i, item in enumerate(items):
        if i == at:
            wait_for(ready, 30, what)
            proxy.reset_all()
        yield item


class Unavailable(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a call cut by the network raises (retried by the client)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "cut by the test"


class CutAfter:
    """A pull call cut after ``n`` messages with UNAVAILABLE, as a dropped link would."""

    def __init__(self, stream: Any, n: int) -> None:
        self.stream, self.n, self.i = stream, n, 0

    def cancel(self) -> None:
        self.stream.cancel()

    def __iter__(self) -> CutAfter:
        return self

    def __next__(self) -> WireItem:
        if self.i == self.n:
            self.stream.cancel()
            raise Unavailable()
        self.i += 1
        return next(self.stream)  # type: ignore[no-any-return]


def cut_first_pull(
    monkeypatch: Any, client: ServerClient, after: int, which: Callable[[Any], bool] = lambda request: True
) -> list[service_pb2.PullRequest]:
    """Make ``client``'s first pull call that ``which(request)`` accepts fail with UNAVAILABLE
    after ``after`` messages (``CutAfter``); returns every PullBody request made, in order."""
    requests: list[service_pb2.PullRequest] = []
    real = client._stub.PullBody
    cut = threading.Lock()  # stripes call from threads of their own: one call is cut
    done = [False]

    def pull_body(request: service_pb2.PullRequest, **kw: Any) -> Any:
        requests.append(request)
        stream = real(request, **kw)
        with cut:
            if done[0] or not which(request):
                return stream
            done[0] = True
        return CutAfter(stream, after)

    monkeypatch.setattr(client._stub, "PullBody", pull_body)
    return requests
