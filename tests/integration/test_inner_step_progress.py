"""The worker's inner steps log step k/K and the running loss at --progress-interval."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dept_comm.participant.client import ServerClient
from dept_comm.participant.persist import WorkerState
from dept_model.tokenizer import build_tokenizers, vocab_digest
from dept_worker.config import WorkerConfig
from dept_worker.loop import Worker
from dept_worker.setup import build_setup, resolve_tokenizer
from tests.integration.servers import serving


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("interval_s", "expected_steps"), [(1e-9, [1, 2, 3]), (3600.0, [])])
def test_inner_steps_log_progress_at_the_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, interval_s: float, expected_steps: list[int]
) -> None:
    caplog.set_level(logging.INFO, logger="dept_worker.loop")
    vocabs = build_tokenizers(["sw"], vocab_size=512, out_dir=tmp_path / "tok", per_source=False)
    with serving(tmp_path, workers=1) as server:
        target = f"127.0.0.1:{server.port}"
        config = WorkerConfig(
            server=target, source="sw", inner_steps=3, batch_size=2, seq_len=32, eval_batches=1,
            vocab=vocabs["global"], state_dir=tmp_path / "w", device="cpu", progress_interval_s=interval_s,
        )  # fmt: skip
        client = ServerClient(target, timeout_s=30)
        try:
            tokenizer = resolve_tokenizer(config, tmp_path / "w")
            digest = vocab_digest(tokenizer)
            reply = client.join(Worker.join_request(config, digest))
            setup = build_setup(config, json.loads(reply.run_config_json), tokenizer, digest)
            worker = Worker(config, client, setup, reply, WorkerState(tmp_path / "w"))
            loss, _ = worker.train()
        finally:
            client.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("inner_step ")]
    assert [line.split()[1] for line in lines] == [f"step={k}/3" for k in expected_steps]
    if lines:  # the last line's running loss is the mean over all three steps: the round's loss
        assert lines[-1] == f"inner_step step=3/3 loss={loss:.4f}"


def test_worker_config_refuses_a_non_positive_progress_interval() -> None:
    with pytest.raises(ValueError, match="progress_interval_s"):
        WorkerConfig(server="h:1", source="sw", progress_interval_s=0.0)
