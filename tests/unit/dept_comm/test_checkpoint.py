"""CheckpointStore: round trip, fallback on corruption, orphan cleanup, one owner per directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from dept_comm.checkpoint import MANIFEST, CheckpointLockedError, CheckpointStore
from dept_comm.errors import InvalidInputError


def _groups(step: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    return {
        "body": {"blocks.0.w": torch.randn(8, 4, generator=gen), "norm": torch.ones(4) * step},
        "embeddings": {"sw": torch.randn(16, 4, generator=gen).to(torch.bfloat16)},
        "outer": {"ids": torch.arange(5, dtype=torch.int64) + step},
    }


def _assert_matches(ckpt_tensors: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    expected = _groups(step)
    assert ckpt_tensors.keys() == expected.keys()
    for group, tensors in expected.items():
        assert ckpt_tensors[group].keys() == tensors.keys()
        for name, t in tensors.items():
            got = ckpt_tensors[group][name]
            assert got.dtype == t.dtype and torch.equal(got, t), (group, name)


def test_round_trip_and_prune(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path, keep=2) as store:
        assert store.latest() is None
        for step in range(4):
            store.save(step, _groups(step), {"round_idx": step + 1, "digest": "ab" * 16, "loss": 1.5})
        assert store.steps() == [2, 3]
        ckpt = store.latest()
        assert ckpt is not None and ckpt.step == 3
        assert ckpt.meta == {"round_idx": 4, "digest": "ab" * 16, "loss": 1.5}
        _assert_matches(ckpt.tensors, 3)
        assert sorted(p.name for p in (tmp_path / "step-00000003").iterdir()) == [
            "body.safetensors",
            "embeddings.safetensors",
            MANIFEST,
            "outer.safetensors",
        ]


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
    _assert_matches(ckpt.tensors, 7)


@pytest.mark.parametrize(
    "victim", ["body.safetensors", "embeddings.safetensors", "outer.safetensors", MANIFEST]
)
def test_flipped_byte_in_any_file_falls_back(
    tmp_path: Path, victim: str, caplog: pytest.LogCaptureFixture
) -> None:
    with CheckpointStore(tmp_path, keep=3) as store:
        store.save(1, _groups(1), {"v": 1})
        store.save(2, _groups(2), {"v": 2})
        path = tmp_path / "step-00000002" / victim
        original = path.read_bytes()
        for pos in (0, len(original) // 2, len(original) - 1):
            for bit in (0x01, 0x80):
                data = bytearray(original)
                data[pos] ^= bit
                path.write_bytes(bytes(data))
                with caplog.at_level(logging.WARNING, logger="dept_comm.checkpoint"):
                    ckpt = store.latest()
                assert ckpt is not None and ckpt.step == 1, (pos, bit)
                _assert_matches(ckpt.tensors, 1)
        assert "checkpoint_skipped step=2" in caplog.text
        path.unlink()  # a missing file falls back too
        ckpt = store.latest()
        assert ckpt is not None and ckpt.step == 1


def test_everything_corrupt_gives_none(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        store.save(5, _groups(5), {})
        (tmp_path / "step-00000005" / "body.safetensors").write_bytes(b"junk")
        assert store.latest() is None


def test_orphans_removed_at_start(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        store.save(1, _groups(1), {"v": 1})
    step_dir = tmp_path / "step-00000001"
    (step_dir / ".body.safetensors.tmp-123-abcd").write_bytes(b"partial")
    (tmp_path / ".manifest.json.tmp-9-ff").write_bytes(b"partial")
    incomplete = tmp_path / "step-00000002"  # a save killed before its manifest
    incomplete.mkdir()
    (incomplete / "body.safetensors").write_bytes(b"half")
    with CheckpointStore(tmp_path) as store:
        assert not (step_dir / ".body.safetensors.tmp-123-abcd").exists()
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
