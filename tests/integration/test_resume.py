"""A push cut by a connection reset resumes: only the chunks the server lacks go again.

The upload is what a real worker sends (int8 with error feedback, from tests/integration/servers.py)
of random normal deltas, and the server's new body is checked against the values it decodes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import pytest
import torch

from dept_comm.codecs import get_codec
from dept_comm.frames import ChunkFrame, StreamItem, chunk_of, header_of
from dept_comm.names import EMB_IDS, EMB_ROWS
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.server.run import RunningServer
from dept_comm.streaming import PULL_LIMITS, receive_stream
from dept_model.tokenizer import build_tokenizers, load_tokenizer, vocab_digest
from tests.faults.proxy import TcpProxy
from tests.integration.servers import join_and_pull, random_delta, reset_at, serving, worker_upload

CHUNK_BYTES = 4 << 10  # many chunks from the tiny model's int8 body (about 100 KB)


@pytest.fixture
def running(tmp_path) -> Iterator[RunningServer]:
    with serving(tmp_path) as server:
        yield server


class CutOnce(list[StreamItem]):
    """An upload whose first pass resets every proxied connection after ``at`` messages, once the
    server has staged some of them (so that there is something to resume from, however slow the
    machine)."""

    def __init__(self, items: list[StreamItem], proxy: TcpProxy, at: int, staged: Callable[[], int]) -> None:
        super().__init__(items)
        self.proxy, self.at, self.staged, self.passes = proxy, at, staged, 0

    def __iter__(self) -> Iterator[StreamItem]:
        self.passes += 1
        items = super().__iter__()
        if self.passes > 1:
            return items
        return reset_at(
            items, self.proxy, self.at, lambda: self.staged() > 0, "the server to stage part of the upload"
        )


def test_reset_mid_upload_resends_only_missing_chunks(running: RunningServer, caplog) -> None:
    with TcpProxy("127.0.0.1", running.port) as proxy:
        client = ServerClient(proxy.address, timeout_s=20)
        try:
            joined = join_and_pull(client)
            sent_upload = worker_upload(joined, seed=11, chunk_bytes=CHUNK_BYTES)
            assert joined.reply.codec_up == "int8"
            upload = sent_upload.messages[:-1]
            chunks = [m for m in upload if isinstance(m, ChunkFrame)]
            assert len(chunks) >= 20
            upload_bytes = sum(m.ByteSize() for m in upload)
            cut = CutOnce(upload, proxy, at=len(upload) // 2, staged=lambda: running.app.staged_upload_bytes)

            up_before = proxy.counts.up
            with caplog.at_level(logging.INFO, logger="dept_comm.participant.client"):
                receipt = client.push(cut)
            sent = proxy.counts.up - up_before

            assert cut.passes >= 2, "the reset must have forced a retry"
            assert receipt.num_chunks == len(chunks) and not receipt.missing_seqs
            resumes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("push_resume")]
            assert resumes, "the retry must have asked the server what it holds"
            held = int(re.search(r"held=(\d+)", resumes[0]).group(1))  # type: ignore[union-attr]
            resending = int(re.search(r"resending=(\d+)", resumes[0]).group(1))  # type: ignore[union-attr]
            assert held >= 1 and resending == len(chunks) - held
            # What crossed the proxy: the first pass (at most all of it) plus only the missing chunks.
            assert sent < upload_bytes + (resending + 2) * (CHUNK_BYTES + 512)
            assert sent < 2 * upload_bytes

            reply = client.commit(sent_upload.commit_request(joined.worker_id, round_idx=0))
            assert reply.accepted
            new_info, new_body = receive_stream(
                client.pull(service_pb2.PullRequest(worker_id=joined.worker_id, full=True)),
                limits=PULL_LIMITS,
            )
            assert new_info.target_version == 1
            # FedAvg of one worker, outer lr 1: the update is what the server decoded from the int8
            # upload, and the body moves by that update as the int8 down-link carries it (the
            # server applies what it sends, so replicas stay bit-exact).
            int8 = get_codec("int8")
            for name, up in sent_upload.decoded.items():
                down = int8.decode(int8.encode(up), tuple(up.shape), torch.float32)
                assert torch.equal(new_body[name], joined.body[name] + down), name
            # The deltas were random normal: int8 does not carry them exactly, so a server that
            # took the payload for anything but int8 (or dropped the feedback) would not match.
            raw = random_delta(joined.body, seed=11)
            assert all(not torch.equal(sent_upload.decoded[n], raw[n]) for n in raw)
        finally:
            client.close()


def test_a_trim_upload_moves_the_workers_rows_by_what_the_server_decoded(tmp_path) -> None:
    """TRIM: a worker sends its rows int8 with error feedback and their global ids raw (as
    dept-worker does); the server folds exactly the decoded rows into its matrix."""
    vocab = build_tokenizers(["sw", "en"], vocab_size=512, out_dir=tmp_path / "tok", per_source=False)[
        "global"
    ]
    ids = torch.randperm(512, generator=torch.Generator().manual_seed(3))[:96].sort().values
    with serving(tmp_path, variant="trim", vocab=vocab) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        try:
            digest = vocab_digest(load_tokenizer(vocab))
            joined = join_and_pull(client, vocab_digest=digest, row_ids=ids.tolist())
            assert torch.equal(joined.body[EMB_IDS], ids) and joined.body[EMB_ROWS].shape[0] == len(ids)
            sent = worker_upload(joined, seed=5, chunk_bytes=CHUNK_BYTES)
            headers = {h.name: h for h in (header_of(chunk_of(m)) for m in sent.messages if chunk_of(m)) if h}
            assert headers[EMB_IDS].codec == "raw" and headers[EMB_ROWS].codec == "int8"
            assert client.push(sent.messages[:-1]).num_chunks == sum(
                chunk_of(m) is not None for m in sent.messages
            )
            assert client.commit(sent.commit_request(joined.worker_id, round_idx=0)).accepted
            _, new_body = receive_stream(
                client.pull(service_pb2.PullRequest(worker_id=joined.worker_id, full=True)),
                limits=PULL_LIMITS,
            )
        finally:
            client.close()
    int8 = get_codec("int8")

    def down(update: torch.Tensor) -> torch.Tensor:  # the server's down-link step (no residual yet)
        return int8.decode(int8.encode(update), tuple(update.shape), torch.float32)

    for name, up in sent.decoded.items():
        if name.startswith("body."):
            assert torch.equal(new_body[name], joined.body[name] + down(up)), name
    dense = torch.zeros(512, joined.body[EMB_ROWS].shape[1])
    dense.index_copy_(0, ids, sent.decoded[EMB_ROWS])  # rows no source sent have a zero delta
    assert torch.equal(new_body[EMB_IDS], ids)
    assert torch.equal(new_body[EMB_ROWS], joined.body[EMB_ROWS] + down(dense)[ids])
    assert not torch.equal(sent.decoded[EMB_ROWS], random_delta(joined.body, seed=5)[EMB_ROWS])  # lossy: int8
