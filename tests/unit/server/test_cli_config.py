"""dept-server and dept-worker flags: bad values fail with a usage error naming the problem."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dept_server.cli import main as server_main
from dept_server.config import ServerConfig
from dept_worker.cli import main as worker_main
from dept_worker.config import WorkerConfig


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--variant", "glob"], "--vocab"),
        (["--workers", "2", "--min-workers", "3"], "min_workers"),
        (["--resume"], "--checkpoint-dir"),
        (["--variant", "nope"], "nope"),
        (["--codec-up", "gzip"], "gzip"),
        (["--port", "70000"], "70000"),
        (["--workers", "5", "--max-workers", "4"], "--max-workers (4) must be at least --workers (5)"),
        (["--max-update-norm-ratio", "0.5"], "--max-update-norm-ratio must be 0 (off) or > 1"),
        (["--heartbeat-timeout", "0"], "--heartbeat-timeout"),
        (["--max-streams", "0"], "--max-streams"),
        (["--tokens", "/nonexistent/tokens.txt"], "tokens.txt"),
    ],
)
def test_server_rejects_bad_flags(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(server_main, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--source", "sw", "--server", "nohostport"], "HOST:PORT"),
        (["--source", "sw", "--device", "tpu"], "tpu"),
        (["--source", "sw", "--inner-steps", "0"], "inner-steps"),
        (["--source", "sw", "--min-bandwidth-mbps", "0"], "min-bandwidth-mbps"),
        (["--source", "sw", "--progress-interval", "0"], "progress-interval"),
        ([], "--source"),
    ],
)
def test_worker_rejects_bad_flags(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(worker_main, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output


def test_configs_validate_directly() -> None:
    assert ServerConfig(workers=3, min_workers=2).quorum == 2
    assert ServerConfig(workers=3).quorum == 3
    with pytest.raises(ValueError, match="rounds"):
        ServerConfig(rounds=0)
    assert WorkerConfig(server="h:1", source="sw").worker_name == "sw"
    assert WorkerConfig(server="h:1", source="sw").data_spec == "sw"
    with pytest.raises(ValueError, match="lr"):
        WorkerConfig(server="h:1", source="sw", lr=0)
    with pytest.raises(ValueError, match="min_bandwidth_mbps"):
        WorkerConfig(server="h:1", source="sw", min_bandwidth_mbps=0)


def test_tokens_and_token_exclude_each_other(tmp_path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("alice a-token\n")
    result = CliRunner().invoke(server_main, ["--tokens", str(tokens), "--token", "shared"])
    assert result.exit_code == 2 and "exclude each other" in result.output, result.output
    assert ServerConfig(max_streams=8).rpc_threads == 8 + 12  # streams, bounded waits, short calls
    assert ServerConfig(max_workers_threads=3).rpc_threads == 3


def test_the_default_staging_budget_follows_the_body() -> None:
    from dept_comm.server.app import auto_staging_memory_mib

    assert auto_staging_memory_mib(64 << 20) == 16  # a quarter of the body, at least 16 MiB
    assert auto_staging_memory_mib(340_000_000) == 81
    assert auto_staging_memory_mib(4_800_000_000) == 1024  # capped
    assert auto_staging_memory_mib(4 << 20) == 16


def test_the_stream_window_is_bounded() -> None:
    with pytest.raises(ValueError, match="stream_window_kib"):
        ServerConfig(stream_window_kib=16)


def test_server_options_name_each_key_once_with_a_fixed_window() -> None:
    """The shared options pin BDP probing on; the server's must turn it off without a duplicate
    key (with both, gRPC took the probe and the 64-worker load peak went from 3.9x to 6.8x)."""
    from dept_comm.server.run import stream_options

    options = stream_options(ServerConfig(stream_window_kib=512))
    keys = [key for key, _ in options]
    assert len(keys) == len(set(keys)), keys
    assert dict(options)["grpc.http2.bdp_probe"] == 0
    assert dict(options)["grpc.http2.lookahead_bytes"] == 512 << 10
