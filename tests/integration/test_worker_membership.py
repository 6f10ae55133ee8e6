"""The worker's round loop against a real in-process server, where membership bites.

A worker that believes it is in a round the server does not count it for (it lost its place: its
push is refused with RoundNotOpenError) must wait for the next round and take part then. Before
this was fixed it asked to wait for round ``round_idx - 1``, which is -1 in round 0: a ValueError
on the uint64 field ended the worker.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from dept_comm.participant.client import ServerClient
from dept_comm.participant.persist import WorkerState
from dept_comm.pb import service_pb2
from dept_model.tokenizer import build_tokenizers, vocab_digest
from dept_worker.config import WorkerConfig
from dept_worker.loop import Worker
from dept_worker.setup import build_setup, resolve_tokenizer
from tests.e2e.harness import wait_for
from tests.integration.servers import join_and_pull, serving, worker_upload


@pytest.mark.timeout(240)
def test_a_worker_refused_as_not_admitted_waits_for_the_next_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    vocabs = build_tokenizers(["sw"], vocab_size=512, out_dir=tmp_path / "tok", per_source=False)
    global_vocab = vocabs["global"]
    with serving(tmp_path, workers=1, rounds=2) as server:
        target = f"127.0.0.1:{server.port}"
        other = ServerClient(target, timeout_s=30)
        a = join_and_pull(other, "a")  # round 0's one member
        config = WorkerConfig(
            server=target, source="sw", name="b", inner_steps=1, batch_size=2, seq_len=32, eval_batches=1,
            vocab=global_vocab, state_dir=tmp_path / "b", device="cpu",
        )  # fmt: skip
        client = ServerClient(target, timeout_s=30)
        tokenizer = resolve_tokenizer(config, tmp_path / "b")
        digest = vocab_digest(tokenizer)
        reply = client.join(Worker.join_request(config, digest))
        assert (reply.round.round_idx, reply.round.admitted_round) == (0, 1)  # told at join
        reply.round.admitted_round = 0  # as if it had been a member and lost its place
        setup = build_setup(config, json.loads(reply.run_config_json), tokenizer, digest)
        worker = Worker(config, client, setup, reply, WorkerState(tmp_path / "b"))
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
        thread.start()
        try:
            wait_for(
                lambda: "is not waiting for this worker" in caplog.text or not thread.is_alive(),
                120,
                "b's round-0 push to be refused and b to wait for round 1",
            )
            assert thread.is_alive(), caplog.text[-3000:]
            # a closes round 0 and leaves; b takes part in round 1, which closes with it alone.
            upload = worker_upload(a)
            other.push(upload.messages[:-1])
            other.commit(upload.commit_request(a.worker_id, 0))
            other.leave(service_pb2.LeaveRequest(worker_id=a.worker_id))
            thread.join(timeout=180)
            assert not thread.is_alive() and result == [0], caplog.text[-3000:]
        finally:
            other.close()
            client.close()
        records = server.app.records
        assert [r.round for r in records] == [0, 1]
        assert [w.worker_id for w in records[1].workers] == [worker.worker_id]
        assert records[1].num_workers == 1
