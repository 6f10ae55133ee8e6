"""Pipelined uploads through a real dept-server: the same round result as the sequential path, a cut
push resumes with only the missing chunks (some tensors already checked on arrival), and a NaN
tensor is still refused at the commit with nothing folded."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from dept_comm.errors import NonFiniteError
from dept_comm.frames import StreamItem, as_message, chunk_of
from dept_comm.names import EMB_IDS, group_of
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.pipeline import PipelinedUpload
from dept_comm.server.run import RunningServer
from dept_comm.streaming import PULL_LIMITS, StreamConfig, StreamOpenInfo, StreamReceiver, encode_stream
from tests.faults.proxy import TcpProxy
from tests.integration.servers import Joined, join_and_pull, random_delta, reset_at, serving

CHUNK_BYTES = 4 << 10


def update(
    joined: Joined,
    *,
    seed: int,
    pipelined: bool,
    poison: str | None = None,
    make: Callable[[Iterator[StreamItem]], PipelinedUpload] = PipelinedUpload,
) -> tuple[PipelinedUpload | list[StreamItem], pb.Commit | None]:
    """An int8 upload with error feedback as a worker encodes it (``poison``: that tensor all NaN,
    raw); pipelined: ``make`` encodes it on its thread."""
    sender = joined.sender()
    delta = random_delta(joined.body, seed)
    if poison is not None:
        delta[poison] = torch.full_like(delta[poison], math.nan)
    info = StreamOpenInfo(
        upload_id=f"u-{seed}-{pipelined}-{poison}",
        sender_id=joined.worker_id,
        base_version=joined.info.target_version,
        base_digest=joined.info.target_digest,
        is_delta=True,
    )
    items = encode_stream(
        delta,
        open_info=info,
        codec=lambda n, t: sender.raw if n in (EMB_IDS, poison) else sender.codec,
        groups={k: group_of(k) for k in delta},
        config=StreamConfig(chunk_bytes=CHUNK_BYTES),
        encoder=lambda n, t, c: sender.feedback.encode(n, t) if c is sender.codec else c.encode(t),
    )
    if pipelined:
        return make(items), None
    messages = list(items)
    return messages[:-1], as_message(messages[-1]).commit


def commit_request(
    joined: Joined, upload: object, commit: pb.Commit | None
) -> service_pb2.CommitUpdateRequest:
    if commit is None:
        assert isinstance(upload, PipelinedUpload)
        commit = upload.commit
    return service_pb2.CommitUpdateRequest(commit=commit, worker_id=joined.worker_id, round_idx=0)


def receiver(server: RunningServer, upload_id: str) -> StreamReceiver:
    """The server's receiver of an upload, once the checks queued so far ended (they run on a pool)."""
    rx = server.app._uploads[upload_id][2]
    rx.settle_checks()
    return rx


def pulled(client: ServerClient, joined: Joined) -> tuple[bytes, dict[str, torch.Tensor]]:
    from dept_comm.streaming import receive_stream

    info, body = receive_stream(
        client.pull(service_pb2.PullRequest(worker_id=joined.worker_id, full=True)), limits=PULL_LIMITS
    )
    return info.target_digest, body


def test_a_pipelined_round_gives_the_sequential_rounds_digest_and_body(tmp_path: Path) -> None:
    results = {}
    for pipelined in (False, True):
        with serving(tmp_path / str(pipelined)) as server:
            client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
            try:
                joined = join_and_pull(client)
                upload, commit = update(joined, seed=7, pipelined=pipelined)
                receipt = client.push(upload)
                assert not receipt.missing_seqs
                rx = receiver(server, as_message(upload[0]).open.upload_id)
                assert rx.checked_on_arrival == len(joined.body)  # every tensor checked on arrival
                assert client.commit(commit_request(joined, upload, commit)).accepted
                results[pipelined] = pulled(client, joined)
            finally:
                client.close()
    (digest_s, body_s), (digest_p, body_p) = results[False], results[True]
    assert digest_s == digest_p
    assert all(torch.equal(body_s[k], body_p[k]) for k in body_s)


class CutPipelined(PipelinedUpload):
    """A pipelined upload whose first pass resets the proxied connection after ``at`` messages, once
    the server has checked at least one tensor on arrival."""

    def __init__(
        self, source: Iterator[StreamItem], proxy: TcpProxy, at: int, checked: Callable[[], int]
    ) -> None:
        self.proxy, self.at, self.checked, self.passes = proxy, at, checked, 0
        super().__init__(source)

    def follow(self) -> Iterator[StreamItem]:
        self.passes += 1
        items = super().follow()
        if self.passes > 1:
            return items
        return reset_at(
            items, self.proxy, self.at, lambda: self.checked() > 0, "the server to check a tensor on arrival"
        )


def test_a_cut_pipelined_push_resends_only_missing_chunks_and_checks_the_rest_on_arrival(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(tmp_path) as server, TcpProxy("127.0.0.1", server.port) as proxy:
        client = ServerClient(proxy.address, timeout_s=20)
        try:
            joined = join_and_pull(client)
            upload_id = "u-3-True-None"
            checked_at_cut: list[int] = []

            def checked() -> int:
                n = receiver(server, upload_id).checked_on_arrival if upload_id in server.app._uploads else 0
                checked_at_cut[:] = [n]
                return n

            sequential, _ = update(joined, seed=3, pipelined=False)
            at = len(sequential) // 2
            made, _ = update(
                joined, seed=3, pipelined=True, make=lambda items: CutPipelined(items, proxy, at, checked)
            )
            cut = made
            assert isinstance(cut, CutPipelined) and as_message(cut[0]).open.upload_id == upload_id
            chunks = sum(chunk_of(m) is not None for m in sequential)
            with caplog.at_level(logging.INFO, logger="dept_comm.participant.client"):
                receipt = client.push(cut)
            # The first pass followed the encoder; the retry sent only the chunks the server lacked.
            assert cut.passes == 1 and receipt.num_chunks == chunks and not receipt.missing_seqs
            assert 0 < checked_at_cut[0] < len(joined.body)  # partly checked when the link was cut
            resumes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("push_resume")]
            assert resumes, "the reset must have forced a retry that asked what the server holds"
            held = int(re.search(r"held=(\d+)", resumes[0]).group(1))  # type: ignore[union-attr]
            resending = int(re.search(r"resending=(\d+)", resumes[0]).group(1))  # type: ignore[union-attr]
            assert held >= 1 and resending == chunks - held
            assert receiver(server, upload_id).checked_on_arrival == len(joined.body)
            assert client.commit(commit_request(joined, cut, None)).accepted
            assert server.app.model.version == 1
        finally:
            client.close()


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_nan_tensor_is_refused_at_the_commit_and_nothing_is_folded(tmp_path: Path, pipelined: bool) -> None:
    with serving(tmp_path) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        try:
            joined = join_and_pull(client)
            poison = next(k for k, v in joined.body.items() if v.is_floating_point())
            bad, commit = update(joined, seed=1, pipelined=pipelined, poison=poison)
            receipt = client.push(bad)  # staged (and checked) without complaint
            assert not receipt.missing_seqs
            with pytest.raises(NonFiniteError, match=re.escape(poison)):
                client.commit(commit_request(joined, bad, commit))
            assert server.app.model.version == 0 and server.app.model.digest == joined.info.target_digest
            # A good update from the same worker then makes the round: only it was folded.
            good, commit = update(joined, seed=2, pipelined=pipelined)
            client.push(good)
            assert client.commit(commit_request(joined, good, commit)).accepted
            digest, body = pulled(client, joined)
            assert server.app.model.version == 1 and all(torch.isfinite(v).all() for v in body.values())
        finally:
            client.close()
