"""dept-comm-server: the generic server's CLI shares dept-server's option definitions."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from dept_comm.server.cli import load_tensors
from dept_comm.server.cli import main as comm_main
from dept_server.cli import main as server_main

SHARED_FLAGS = (
    "--rounds",
    "--workers",
    "--codec-up",
    "--checkpoint-dir",
    "--max-streams",
    "--tls-cert",
    "--grace",
)


def test_both_clis_offer_the_shared_flags_and_only_dept_server_the_dept_ones() -> None:
    comm = CliRunner().invoke(comm_main, ["--help"]).output
    dept = CliRunner().invoke(server_main, ["--help"]).output
    for flag in SHARED_FLAGS:
        assert flag in comm and flag in dept
    for flag in ("--variant", "--vocab", "--seed"):
        assert flag in dept and flag not in comm
    assert "--tensors" in comm and "--tensors" not in dept


def test_comm_server_refuses_bad_tensors_and_flags(tmp_path: Path) -> None:
    ints = tmp_path / "ints.safetensors"
    save_file({"step": torch.zeros(2, dtype=torch.int64)}, str(ints))
    result = CliRunner().invoke(comm_main, ["--tensors", str(ints)])
    assert result.exit_code == 2 and "not floating point" in result.output
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    result = CliRunner().invoke(comm_main, ["--tensors", str(garbage)])
    assert result.exit_code == 2 and "not a readable safetensors file" in result.output
    good = tmp_path / "good.safetensors"
    save_file({"fc1.weight": torch.ones(2, 2, dtype=torch.bfloat16)}, str(good))
    result = CliRunner().invoke(comm_main, ["--tensors", str(good), "--workers", "2", "--min-workers", "3"])
    assert result.exit_code == 2 and "min_workers" in result.output
    loaded = load_tensors(good)
    assert loaded["fc1.weight"].dtype == torch.float32
