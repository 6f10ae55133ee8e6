"""Uploads beyond --staging-memory-mib wait in files that go when the upload is folded,
superseded or dropped; a commit folds tensor by tensor (real gRPC server)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.server.aggregate import RoundAggregate
from dept_comm.staging import STAGING_SUFFIX
from dept_comm.streaming import StreamReceiver
from tests.e2e.harness import wait_for
from tests.integration.servers import join_and_pull, random_delta, serving

CHUNK_BYTES = 4 << 10


def test_staging_spills_past_the_budget_and_files_go_with_the_upload(tmp_path):
    stale = tmp_path / "ckpt" / "staging" / f"upload-stale{STAGING_SUFFIX}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed server")
    with serving(tmp_path, workers=2, staging_memory_mib=0) as server:
        app = server.app
        assert app.staging.directory == tmp_path / "ckpt" / "staging"
        assert not stale.exists(), "stale staging files are removed at start"
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        try:
            joined = join_and_pull(client)
            sender = joined.sender()
            first, second, third = (
                sender.upload(random_delta(joined.body, s), info=joined.info, chunk_bytes=CHUNK_BYTES)
                for s in (1, 2, 3)
            )
            client.push(first.messages[:-1])
            files = app.staging.files()
            assert len(files) == 1 and files[0].stat().st_size > 0
            assert app.staging.memory_bytes == 0  # a zero budget: every byte went to the file
            client.push(second.messages[:-1])  # supersedes the first: its file goes
            wait_for(lambda: len(app.staging.files()) == 1 and app.staging.files() != files, 10, "supersede")
            client.commit(second.commit_request(joined.worker_id, 0))
            # The round has one of its 2 members: the commit waits for its turn, still in its file.
            assert app._aggregate.queued == 1 and app._aggregate.num_contributions == 0
            assert len(app.staging.files()) == 1
            other = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
            try:
                late = join_and_pull(other, "en")
                up = late.sender().upload(random_delta(late.body, 4), info=late.info, chunk_bytes=CHUNK_BYTES)
                other.push(up.messages[:-1])
                other.commit(up.commit_request(late.worker_id, 0))  # closes the round: both folded
            finally:
                other.close()
            assert app.model.version == 1 and app.staging.files() == []
            client.push(third.messages[:-1])  # refused: its round has ended; never staged
        except Exception as err:  # the third push is refused
            assert "has ended" in str(err)
        finally:
            assert app.staging.files() == []
            client.close()


def test_a_dropped_upload_loses_its_file(tmp_path):
    with serving(tmp_path, workers=2, staging_memory_mib=0) as server:
        app = server.app
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        try:
            joined = join_and_pull(client)
            upload = joined.sender().upload(
                random_delta(joined.body, 1), info=joined.info, chunk_bytes=CHUNK_BYTES
            )
            client.push(upload.messages[: len(upload.messages) // 2])
            assert len(app.staging.files()) == 1
            client.leave(service_pb2.LeaveRequest(worker_id=joined.worker_id, reason="test"))
            wait_for(lambda: app.staging.files() == [], 30, "the ticker to drop the left worker's upload")
        finally:
            client.close()


@pytest.mark.parametrize("budget_mib", [0, 64])
def test_a_fold_from_staging_equals_the_in_memory_result(tmp_path, budget_mib):
    """The body after a round is the same whether the upload waited in memory or in a file."""
    with serving(tmp_path, workers=1, staging_memory_mib=budget_mib) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        try:
            joined = join_and_pull(client)
            upload = joined.sender().upload(random_delta(joined.body, 7), info=joined.info)
            client.push(upload.messages[:-1])
            client.commit(upload.commit_request(joined.worker_id, 0))
            for name, before in joined.body.items():
                assert (
                    not server.app.model.shared[name].equal(before) or upload.decoded[name].abs().max() == 0
                )
            digests = server.app.model.digest
        finally:
            client.close()
    assert isinstance(digests, bytes)


def test_commit_folds_one_decoded_tensor_at_a_time(tmp_path, monkeypatch):
    """The commit path never holds two decoded tensors of one update at once: each is folded and
    dropped before the next is decoded (so no full fp32 copy of an update exists)."""
    alive_max = [0]
    served: list[StreamReceiver] = []
    real_tensors = StreamReceiver.tensors

    def watched(self, device=None):
        if self._staging is None:  # the test's own pulls (in this process): not the server's
            yield from real_tensors(self, device)
            return
        served.append(self)
        refs: list[weakref.ref[torch.Tensor]] = []
        for spec, t in real_tensors(self, device):
            gc.collect()
            alive = sum(r() is not None for r in refs)
            alive_max[0] = max(alive_max[0], alive)
            refs.append(weakref.ref(t))
            yield spec, t
            del t

    monkeypatch.setattr(StreamReceiver, "tensors", watched)
    folds = []
    real_fold = RoundAggregate.fold

    def fold(self, update, **kw):
        folds.append(type(update).__name__)
        return real_fold(self, update, **kw)

    monkeypatch.setattr(RoundAggregate, "fold", fold)
    with serving(tmp_path, workers=1) as server:  # the round's only member: folded at its commit
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        try:
            joined = join_and_pull(client)
            upload = joined.sender().upload(random_delta(joined.body, 5), info=joined.info)
            client.push(upload.messages[:-1])
            client.commit(upload.commit_request(joined.worker_id, 0))
        finally:
            client.close()
    assert folds == ["generator"], "the commit hands the aggregate a stream of tensors, not a dict"
    assert len(served) == 1 and len(upload.decoded) > 3 and alive_max[0] == 0
