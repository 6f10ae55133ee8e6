"""dept-server refusing to start, at the command line: a clear message, a non-zero exit, no traceback.

Two servers on one checkpoint directory (the second is refused, the first runs on unharmed), a
port another socket holds, and ``--resume`` from a checkpoint made with another variant, model
or vocabulary (refused before anything in the directory changes).
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import (
    EXIT_S,
    MARGIN_S,
    RUN_S,
    START_S,
    Server,
    describe,
    records,
    run_cli,
    start_worker,
    wait_workers,
)
from tests.e2e.test_rounds import worker_args

pytestmark = pytest.mark.slow


def base_args(
    tmp: Path, *, variant: str = "spec", model: str = "tiny", vocab: Path | None = None
) -> list[str]:
    return [
        "--port", "0", "--rounds", "1", "--workers", "1", "--variant", variant, "--model", model,
        "--checkpoint-dir", str(tmp / "ckpt"), "--metrics-path", str(tmp / "metrics.jsonl"),
        "--round-timeout", "300", *(["--vocab", str(vocab)] if vocab is not None else []),
    ]  # fmt: skip


def assert_refused(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The CLI exited non-zero with a message holding every needle (case-insensitive), no traceback."""
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode != 0, f"expected a refusal, got exit 0:\n{output[-3000:]}"
    assert "Traceback" not in output, f"a refusal must be a message, not a traceback:\n{output[-4000:]}"
    for needle in needles:
        assert needle.lower() in output.lower(), f"{needle!r} not in the message:\n{output[-3000:]}"
    return output


@pytest.mark.timeout(START_S + START_S + RUN_S + EXIT_S + MARGIN_S)
def test_second_server_on_one_checkpoint_dir_is_refused(global_vocab: Path, tmp_path: Path) -> None:
    first = Server(base_args(tmp_path), tmp_path / "server.log")
    lock = tmp_path / "ckpt" / ".lock"
    assert lock.read_text().strip() == str(first.proc.pid)

    second = run_cli(base_args(tmp_path), timeout=START_S)
    assert_refused(second, str(tmp_path / "ckpt"), "lock")
    assert lock.read_text().strip() == str(first.proc.pid), "the refused server must not take the lock"

    # The first server is unaffected: a worker runs its round to the end and it checkpoints.
    worker = start_worker(worker_args(first.port, "sw", global_vocab, tmp_path), tmp_path / "sw.log")
    wait_workers({"sw": worker}, RUN_S)
    assert first.wait(EXIT_S) == 0, describe()
    assert [r["round"] for r in records(tmp_path / "metrics.jsonl") if r.get("kind") != "final"] == [0]
    assert (tmp_path / "ckpt" / "step-00000001" / "manifest.json").exists(), sorted(
        (tmp_path / "ckpt").iterdir()
    )


@pytest.mark.timeout(START_S + MARGIN_S)
def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = base_args(tmp_path)
        args[args.index("--port") + 1] = str(port)
        done = run_cli(args, timeout=START_S)
    assert_refused(done, str(port))
    assert "in use" in done.stderr.lower() or "address already in use" in done.stderr.lower(), done.stderr[
        -2000:
    ]


def checkpoint_files(ckpt: Path) -> dict[str, bytes]:
    """Every file of the checkpoint directory with its bytes, except the lock (a process's pid)."""
    return {
        str(p.relative_to(ckpt)): p.read_bytes()
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def make_checkpoint(tmp: Path, args: list[str]) -> dict[str, bytes]:
    """A real checkpoint: a server stopped by SIGTERM before any round checkpoints round 0."""
    server = Server(args, tmp / "server.log")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(EXIT_S) == 0, describe()
    files = checkpoint_files(tmp / "ckpt")
    assert any(name.endswith("manifest.json") for name in files), sorted(files)
    return files


RESUME_CASES = {
    # id: (checkpoint made with, resumed with, words the refusal must name)
    "variant": ({"variant": "spec"}, {"variant": "glob"}, ("variant", "spec", "glob")),
    "model": ({"model": "tiny"}, {"model": "small"}, ("model", "tiny", "small")),
    "vocab": ({"variant": "glob"}, {"variant": "glob", "vocab": "sw"}, ("vocab",)),
}


@pytest.mark.timeout(START_S + EXIT_S + START_S + MARGIN_S)
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_with_another_setup_is_refused(case: str, vocabs: dict[str, Path], tmp_path: Path) -> None:
    made, resumed, needles = RESUME_CASES[case]

    def args(setup: dict[str, str]) -> list[str]:
        return base_args(
            tmp_path,
            variant=setup.get("variant", "spec"),
            model=setup.get("model", "tiny"),
            vocab=vocabs[setup.get("vocab", "global")],
        )

    before = make_checkpoint(tmp_path, args(made))
    done = run_cli([*args(resumed), "--resume"], timeout=START_S)
    output = assert_refused(done, *needles)
    if len(needles) == 3:  # the checkpoint's value and the requested one, in one message
        key, saved, wanted = needles
        assert any(saved in line and wanted in line for line in output.splitlines() if key in line), output[
            -3000:
        ]
    assert checkpoint_files(tmp_path / "ckpt") == before, (
        "a refused --resume must leave the checkpoint as it was"
    )
