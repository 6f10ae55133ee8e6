"""The pieces of a torchrun worker that need no process group: --device, data shards, launch command."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dept_model.data import TokenBatches
from dept_worker.cli import main as worker_main
from dept_worker.device import check_device, resolve_device
from dept_worker.dist import single_process_position, torchrun_argv
from dept_worker.node import rank_positions, shard_batches


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_forms_accepted(spec: str) -> None:
    check_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:a", "CPU", "cuda0", "mps:0"])
def test_device_forms_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:K"):
        check_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x"])
def test_worker_cli_refuses_bad_device(spec: str) -> None:
    result = CliRunner().invoke(worker_main, ["--source", "sw", "--device", spec])
    assert result.exit_code == 2, result.output
    assert spec in result.output and "cuda:K" in result.output


def test_worker_cli_refuses_zero_ranks() -> None:
    result = CliRunner().invoke(worker_main, ["--source", "sw", "--nproc-per-node", "0"])
    assert result.exit_code == 2 and "nproc-per-node" in result.output, result.output


def test_cpu_and_auto_resolve_here() -> None:
    assert resolve_device("cpu", local_rank=3, world_size=4) == torch.device("cpu")
    expected = torch.device("cuda", 1) if torch.cuda.device_count() > 1 else None
    if not torch.cuda.is_available():
        assert resolve_device("auto", local_rank=1, world_size=2) == torch.device("cpu")
    elif expected is not None:
        assert resolve_device("auto", local_rank=1, world_size=2) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(spec: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(spec)
    result = CliRunner().invoke(worker_main, ["--source", "sw", "--device", spec])
    assert result.exit_code == 2 and "CUDA is not available" in result.output, result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_checks() -> None:
    count = torch.cuda.device_count()
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=count - 1, world_size=count) == torch.device("cuda", count - 1)
    with pytest.raises(ValueError, match=f"only {count} CUDA devices"):
        resolve_device(f"cuda:{count}")
    with pytest.raises(ValueError, match="names one GPU"):
        resolve_device("cuda:0", world_size=2)


def test_torchrun_argv_drops_the_rank_count() -> None:
    argv = ["--source", "sw", "--nproc-per-node", "4", "--seq-len", "32", "--nproc-per-node=4"]
    command = torchrun_argv(argv, 4)
    assert command[:7] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
    ]
    assert command[7:] == ["dept_worker.cli", "--source", "sw", "--seq-len", "32"]


def _windows_served(batches: TokenBatches, num_batches: int) -> set[int]:
    """The first token of each window served (the stream is 0, 1, 2, ..., so a token is its index)."""
    return {int(x[0]) for _ in range(num_batches) for x in batches.next_batch()[0]}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_disjoint_and_cover_every_window(world_size: int) -> None:
    seq_len, tokens = 8, np.arange(8 * 25 + 1, dtype=np.int64)
    whole = TokenBatches(tokens, seq_len=seq_len, batch_size=1, seed=7)
    shards = [shard_batches(whole, r, world_size) for r in range(world_size)]
    assert sum(s.num_windows for s in shards) == whole.num_windows == 25
    served = [_windows_served(s, s.num_windows) for s in shards]  # one epoch each
    for r, starts in enumerate(served):
        assert len(starts) == shards[r].num_windows
        for other in served[r + 1 :]:
            assert not starts & other
    assert set().union(*served) == {i * seq_len for i in range(25)}


def test_a_shard_resumes_from_its_state() -> None:
    whole = TokenBatches(np.arange(8 * 40 + 1, dtype=np.int64), seq_len=8, batch_size=3, seed=1)
    shard = shard_batches(whole, 1, 2)
    shard.next_batch()
    again = shard_batches(whole, 1, 2)
    again.load_state_dict(shard.state_dict())
    assert torch.equal(again.next_batch()[0], shard.next_batch()[0])


def test_too_few_windows_for_the_ranks() -> None:
    whole = TokenBatches(np.arange(8 * 2 + 1, dtype=np.int64), seq_len=8, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="fewer than the 3 ranks"):
        shard_batches(whole, 0, 3)


def test_saved_positions_reused_only_for_the_same_rank_count(caplog: pytest.LogCaptureFixture) -> None:
    pos = {"epoch": 0, "position": 4, "seed": 1, "seq_len": 8, "num_windows": 20}
    assert rank_positions({"world_size": 2, "ranks": [pos, pos]}, 2, Path("d")) == [pos, pos]
    assert rank_positions({"world_size": 2, "ranks": [pos, pos]}, 4, Path("d")) is None
    assert rank_positions(pos, 2, Path("d")) is None
    assert rank_positions(pos, 1, Path("d")) == [pos]  # one rank reads the whole stream, as one process
    assert "single-process" in caplog.text and "2-rank worker" in caplog.text


def test_a_single_process_continues_a_one_rank_ddp_node_only() -> None:
    pos = {"epoch": 1, "position": 4, "seed": 1, "seq_len": 8, "num_windows": 20}
    assert single_process_position(pos, Path("d")) == pos
    assert single_process_position({"world_size": 1, "ranks": [pos]}, Path("d")) == pos
    with pytest.raises(ValueError, match="--nproc-per-node 2 --parallel ddp"):
        single_process_position({"world_size": 2, "ranks": [pos, pos]}, Path("d"))
    with pytest.raises(ValueError, match="--nproc-per-node 1 --parallel fsdp"):
        single_process_position({"world_size": 1, "parallel": "fsdp", "ranks": [pos]}, Path("d"))
