"""gRPC's transport is chosen before grpc is imported (dept_comm.grpc_env), in a fresh interpreter
for each real import order: by the library, by every CLI's module, and never over a user's choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dept_comm.grpc_env import ENV, EXPERIMENTS, TESTED_GRPCIO, choose

IN_RANGE = f"{TESTED_GRPCIO[1][0]}.{TESTED_GRPCIO[1][1]}.3"


@pytest.mark.parametrize(
    ("current", "imported", "grpcio", "want", "source"),
    [
        (None, False, IN_RANGE, EXPERIMENTS, "dept_comm"),
        (None, False, f"{TESTED_GRPCIO[0][0]}.{TESTED_GRPCIO[0][1]}.0", EXPERIMENTS, "dept_comm"),
        (EXPERIMENTS, False, IN_RANGE, EXPERIMENTS, "dept_comm"),  # inherited from a parent process
        (EXPERIMENTS, True, IN_RANGE, EXPERIMENTS, "dept_comm"),
        ("", False, IN_RANGE, "", "user"),  # empty: gRPC's defaults, on purpose
        ("tcp_rcv_lowat", False, IN_RANGE, "tcp_rcv_lowat", "user"),
        (None, True, IN_RANGE, None, "grpc-imported-first"),
        (None, False, None, None, "no-grpcio"),
        (None, False, f"{TESTED_GRPCIO[1][0]}.{TESTED_GRPCIO[1][1] + 1}.0", None, "untested-grpcio"),
        (None, False, f"{TESTED_GRPCIO[0][0]}.{TESTED_GRPCIO[0][1] - 1}.2", None, "untested-grpcio"),
        (None, False, "2.0.0", None, "untested-grpcio"),
        (None, False, "garbage", None, "untested-grpcio"),
    ],
)
def test_choose(
    current: str | None, imported: bool, grpcio: str | None, want: str | None, source: str
) -> None:
    chosen = choose(current, grpc_imported=imported, grpcio=grpcio)
    assert (chosen.experiments, chosen.source) == (want, source)
    assert chosen.grpcio == (grpcio or "none")
    assert f"source={source}" in chosen.describe()


def _fresh(code: str, env_value: str | None = None) -> dict[str, object]:
    """Run ``code`` in a new interpreter (GRPC_EXPERIMENTS unset unless given); it prints JSON."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if env_value is not None:
        env[ENV] = env_value
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


_REPORT = (
    "import json, os, sys; from dept_comm.grpc_env import transport; t = transport(); "
    f"print(json.dumps({{'env': os.environ.get('{ENV}'), 'source': t.source, "
    "'experiments': t.experiments, 'grpc': 'grpc' in sys.modules}))"
)


def _expected_source() -> str:
    from importlib import metadata

    return choose(None, grpc_imported=False, grpcio=metadata.version("grpcio")).source


def test_importing_dept_comm_first_sets_it_before_grpc_reads_it() -> None:
    got = _fresh("import dept_comm, grpc; " + _REPORT)
    source = _expected_source()
    assert got["source"] == source
    assert got["env"] == (EXPERIMENTS if source == "dept_comm" else None)


def test_grpc_imported_first_is_left_alone() -> None:
    got = _fresh("import grpc, dept_comm; " + _REPORT)
    assert (got["env"], got["source"], got["experiments"]) == (None, "grpc-imported-first", None)


@pytest.mark.parametrize("value", ["", "tcp_rcv_lowat"])
def test_a_users_setting_wins(value: str) -> None:
    got = _fresh("import dept_comm; " + _REPORT, env_value=value)
    assert (got["env"], got["source"]) == (value, "user")


# Every console script's module (pyproject [project.scripts]); dept-bench's through its loader.
_ENTRY_IMPORTS = [
    "import dept_server.cli",
    "import dept_comm.server.cli",
    "import dept_worker.cli",
    "import dept_server.local",
    "import dept_server.report",
    "import dept_experiment.cli",
    "from dept_bench.cli import load; load('dept_bench.wire'); load('dept_bench.link'); load('dept_bench.load')",
]


@pytest.mark.parametrize("entry", _ENTRY_IMPORTS)
def test_every_cli_chooses_before_grpc_is_imported(entry: str) -> None:
    got = _fresh(entry + "; " + _REPORT)
    if _expected_source() != "dept_comm":
        pytest.skip(f"this grpcio is outside {TESTED_GRPCIO}: nothing is set")
    if got["grpc"]:  # the module imports grpc: dept_comm must have chosen first
        assert (got["env"], got["source"]) == (EXPERIMENTS, "dept_comm"), entry


def test_a_child_process_inherits_it() -> None:
    code = (
        "import dept_comm, subprocess, sys; "
        f"subprocess.run([sys.executable, '-c', {('import grpc, dept_comm; ' + _REPORT)!r}], check=True)"
    )
    got = _fresh(code)
    source = _expected_source()
    assert got["source"] == source
    assert got["env"] == (EXPERIMENTS if source == "dept_comm" else None)
