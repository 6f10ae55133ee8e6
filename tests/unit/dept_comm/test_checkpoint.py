"""CheckpointStore on what the server saves: round trip, fallback on corruption, orphans, one owner.

The groups are the real server's (``GlobalModel.checkpoint_groups()`` of a ServerApp after outer
steps, tests/fixtures/server_state.py: ``shared``, ``outer`` with float64/int64/uint8 scalars,
``feedback``), and the slow tests below damage a copy of the checkpoints a real run wrote.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dept_comm.checkpoint import MANIFEST, Checkpoint, CheckpointLockedError, CheckpointStore
from dept_comm.errors import InvalidInputError
from dept_comm.server.app import ServerApp
from dept_server.config import ServerConfig
from dept_server.serve import build_app
from tests.fixtures.real_run import TEST_TIMEOUT_S, RealRun
from tests.fixtures.server_state import Groups, server_groups, shifted

GROUPS = ("feedback", "outer", "shared")  # what GlobalModel.checkpoint_groups() returns


def _groups(step: int) -> Groups:
    return shifted(server_groups(), step)


def _assert_equal(got: Groups, expected: Groups) -> None:
    assert got.keys() == expected.keys()
    for group, tensors in expected.items():
        assert got[group].keys() == tensors.keys(), group
        for name, t in tensors.items():
            assert got[group][name].dtype == t.dtype and torch.equal(got[group][name], t), (group, name)


def test_the_servers_groups_are_what_these_tests_save() -> None:
    groups = server_groups()
    assert sorted(groups) == list(GROUPS)
    dtypes = {t.dtype for ts in groups.values() for t in ts.values()}
    assert {torch.float32, torch.float64, torch.int64, torch.uint8} <= dtypes
    assert any(k.startswith("buf.") for k in groups["outer"]), "nesterov momentum after a round"
    assert any(bool(t.abs().sum()) for t in groups["feedback"].values()), "int8 residuals after a round"


def test_round_trip_and_prune(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path, keep=2) as store:
        assert store.latest() is None
        for step in range(4):
            store.save(step, _groups(step), {"round_idx": step + 1, "digest": "ab" * 16, "loss": 1.5})
        assert store.steps() == [2, 3]
        ckpt = store.latest()
        assert ckpt is not None and ckpt.step == 3
        assert ckpt.meta == {"round_idx": 4, "digest": "ab" * 16, "loss": 1.5}
        _assert_equal(ckpt.tensors, _groups(3))
        assert sorted(p.name for p in (tmp_path / "step-00000003").iterdir()) == sorted(
            [*(f"{g}.safetensors" for g in GROUPS), MANIFEST]
        )


def test_a_saved_server_state_restores_into_a_fresh_server(tmp_path: Path) -> None:
    """What the store gives back is what GlobalModel.restore takes: same body digest, same state."""
    config = ServerConfig(port=0, variant="spec", model="tiny", outer="nesterov")
    with CheckpointStore(tmp_path) as store:
        store.save(1, server_groups(2), {})
        ckpt = store.latest()
    assert ckpt is not None
    app = build_app(config)
    try:
        before = app.model.digest
        app.model.restore(ckpt.tensors, version=2)
        assert app.model.digest != before
        _assert_equal(app.model.checkpoint_groups(), server_groups(2))
    finally:
        app.close()


def test_save_copies_shared_and_strided_tensors(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    with CheckpointStore(tmp_path) as store:
        store.save(0, {"body": {"a": base, "tied": base, "col": base[:, 1]}}, {})
        ckpt = store.latest()
    assert ckpt is not None
    assert torch.equal(ckpt.tensors["body"]["tied"], base)
    assert torch.equal(ckpt.tensors["body"]["col"], base[:, 1])


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        store.save(1, _groups(1), {"v": 1})
        store.save(1, _groups(7), {"v": 2})
        ckpt = store.latest()
    assert ckpt is not None and ckpt.meta == {"v": 2}
    _assert_equal(ckpt.tensors, _groups(7))


def _flip_bits_and_check_fallback(
    store: CheckpointStore, path: Path, check: Callable[[Checkpoint], None], caplog: pytest.LogCaptureFixture
) -> None:
    """Flip bits at the start, middle and end of ``path``: ``latest()`` must fall back each time."""
    original = path.read_bytes()
    for pos in (0, len(original) // 2, len(original) - 1):
        for bit in (0x01, 0x80):
            data = bytearray(original)
            data[pos] ^= bit
            path.write_bytes(bytes(data))
            with caplog.at_level(logging.WARNING, logger="dept_comm.checkpoint"):
                ckpt = store.latest()
            assert ckpt is not None, (pos, bit)
            check(ckpt)
    path.write_bytes(original)


@pytest.mark.parametrize("victim", [*(f"{g}.safetensors" for g in GROUPS), MANIFEST])
def test_flipped_byte_in_any_file_falls_back(
    tmp_path: Path, victim: str, caplog: pytest.LogCaptureFixture
) -> None:
    with CheckpointStore(tmp_path, keep=3) as store:
        store.save(1, _groups(1), {"v": 1})
        store.save(2, _groups(2), {"v": 2})

        def was_step_1(ckpt: Checkpoint) -> None:
            assert ckpt.step == 1
            _assert_equal(ckpt.tensors, _groups(1))

        path = tmp_path / "step-00000002" / victim
        _flip_bits_and_check_fallback(store, path, was_step_1, caplog)
        assert "checkpoint_skipped step=2" in caplog.text
        path.unlink()  # a missing file falls back too
        ckpt = store.latest()
        assert ckpt is not None and ckpt.step == 1


def test_everything_corrupt_gives_none(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        store.save(5, _groups(5), {})
        (tmp_path / "step-00000005" / "shared.safetensors").write_bytes(b"junk")
        assert store.latest() is None


def test_orphans_removed_at_start(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        store.save(1, _groups(1), {"v": 1})
    step_dir = tmp_path / "step-00000001"
    (step_dir / ".shared.safetensors.tmp-123-abcd").write_bytes(b"partial")
    (tmp_path / ".manifest.json.tmp-9-ff").write_bytes(b"partial")
    incomplete = tmp_path / "step-00000002"  # a save killed before its manifest
    incomplete.mkdir()
    (incomplete / "shared.safetensors").write_bytes(b"half")
    with CheckpointStore(tmp_path) as store:
        assert not (step_dir / ".shared.safetensors.tmp-123-abcd").exists()
        assert not (tmp_path / ".manifest.json.tmp-9-ff").exists()
        assert not incomplete.exists()
        ckpt = store.latest()
        assert ckpt is not None and ckpt.step == 1


def test_second_store_on_same_directory_fails_clearly(tmp_path: Path) -> None:
    first = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointLockedError, match=rf"{tmp_path}.*another server \(pid {os.getpid()}\)"):
        CheckpointStore(tmp_path)
    first.close()
    first.close()  # idempotent
    second = CheckpointStore(tmp_path)  # the lock is free again
    with pytest.raises(InvalidInputError, match="closed"):
        first.save(0, {}, {})
    second.close()


def test_bad_arguments(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        with pytest.raises(InvalidInputError, match="group name"):
            store.save(0, {"../evil": {}}, {})
        with pytest.raises(InvalidInputError, match="JSON"):
            store.save(0, {}, {"x": float("nan")})
        with pytest.raises(InvalidInputError, match="JSON"):
            store.save(0, {}, {"x": object()})
        with pytest.raises(InvalidInputError, match="non-negative"):
            store.save(-1, {}, {})
        assert store.steps() == []
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


# -- the checkpoints a real run wrote -------------------------------------------------------


def _resume(run: RealRun, directory: Path) -> ServerApp:
    """A ServerApp configured like the run's server, resuming from ``directory``."""
    return build_app(
        ServerConfig(
            port=0, rounds=run.rounds, workers=len(run.sources), variant=run.variant, model="tiny",
            vocab=run.vocab, codec_up=run.codec, codec_down=run.codec, checkpoint_dir=directory, resume=True,
        )
    )  # fmt: skip


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_real_runs_checkpoints_load_and_resume(real_run: RealRun, tmp_path: Path) -> None:
    directory = real_run.copy_checkpoints(tmp_path / "ckpt")
    rounds = real_run.round_lines
    with CheckpointStore(directory) as store:
        assert store.steps() == [real_run.rounds - 1, real_run.rounds]  # keep=2; step = next round
        ckpt = store.latest()
    assert ckpt is not None and ckpt.step == real_run.rounds
    assert sorted(ckpt.tensors) == list(GROUPS)
    assert ckpt.meta["variant"] == real_run.variant and ckpt.meta["round_idx"] == real_run.rounds
    assert ckpt.meta["version"] == rounds[-1]["version"]
    assert ckpt.meta["records"] == rounds  # the JSONL lines are these records
    shared = ckpt.tensors["shared"]
    assert "emb.weight" in shared and all(t.dtype == torch.float32 for t in shared.values())
    app = _resume(real_run, directory)
    try:
        assert app.model.version == ckpt.meta["version"]
        assert app.model.digest.hex() == ckpt.meta["digest"]
        assert app.finished.is_set(), "resumed after the last round"
    finally:
        app.close()


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("group", [*GROUPS, "manifest"])
def test_a_damaged_real_checkpoint_falls_back_to_the_previous_round(
    real_run: RealRun, tmp_path: Path, group: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory = real_run.copy_checkpoints(tmp_path / "ckpt")
    newest, previous = real_run.rounds, real_run.rounds - 1
    name = MANIFEST if group == "manifest" else f"{group}.safetensors"
    with CheckpointStore(directory) as store:
        expected = store.load(previous)

        def was_previous(ckpt: Checkpoint) -> None:
            assert ckpt.step == previous
            _assert_equal(ckpt.tensors, expected.tensors)

        _flip_bits_and_check_fallback(store, directory / f"step-{newest:08d}" / name, was_previous, caplog)
        assert f"checkpoint_skipped step={newest}" in caplog.text
        data = (directory / f"step-{newest:08d}" / name).read_bytes()
        (directory / f"step-{newest:08d}" / name).write_bytes(data[: len(data) // 2])  # torn
    app = _resume(real_run, directory)  # the server resumes from the round before
    try:
        assert app.model.version == expected.meta["version"] == real_run.round_lines[-2]["version"]
        assert app.coordinator.current_round().round_idx == previous
        assert not app.finished.is_set()
    finally:
        app.close()
