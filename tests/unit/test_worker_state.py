"""What dept-worker leaves in --state-dir after a real run: loadable, and agreeing with the server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dept_comm.checkpoint import CheckpointStore
from dept_comm.participant.persist import WorkerState
from tests.fixtures.real_run import TEST_TIMEOUT_S, RealRun

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)  # the session's real run may be set up here


@pytest.mark.parametrize("source", ["sw", "en"])
def test_a_real_workers_state_loads_and_matches_the_server(
    real_run: RealRun, source: str, tmp_path: Path
) -> None:
    directory = tmp_path / "state"
    shutil.copytree(real_run.worker_dirs[source], directory)  # WorkerState tidies its directory
    saved = WorkerState(directory).load()
    assert saved is not None
    assert saved["round_idx"] == real_run.rounds - 1  # the last round it trained
    assert saved["trainer_path"].is_file()
    with CheckpointStore(real_run.copy_checkpoints(tmp_path / "ckpt")) as store:
        server = store.latest()
    assert server is not None
    shared = server.tensors["shared"]
    # Error-feedback residuals for exactly the tensors a glob worker uploads, in their shapes.
    assert set(saved["feedback"]) == set(shared)
    for name, residual in saved["feedback"].items():
        assert residual.shape == shared[name].shape and bool(residual.isfinite().all()), name
    # Every version it pulled verified against the digests the server recorded for the round.
    rows = [json.loads(line) for line in (directory / "digests.jsonl").read_text().splitlines()]
    by_version = {int(row["version"]): row for row in rows}
    for r in real_run.round_lines:
        assert by_version[r["version"]]["body_digest"] == r["body_digest"], (source, r["round"])
    assert max(by_version) == real_run.rounds  # it pulled the final body to evaluate it
