"""Start real dept-server / dept-worker processes for end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Every process a test starts, so that a failing test leaves none running (see conftest).
STARTED: list[subprocess.Popen[Any]] = []

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")


class Server:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._log_f = open(log, "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dept_server.cli", *args],
            stdout=subprocess.PIPE,
            stderr=self._log_f,
            text=True,
            env=ENV,
        )
        STARTED.append(self.proc)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"server died at start: {log.read_text()[-3000:]}")
        info = json.loads(line)
        self.port: int = info["port"]
        self.metrics_port: int | None = info.get("metrics_port")

    def wait(self, timeout: float = 240) -> int:
        code = self.proc.wait(timeout=timeout)
        self._log_f.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log_f.close()


def start_worker(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    f = open(log, "a")  # noqa: SIM115 (inherited by the child; closed with the test process)
    proc = subprocess.Popen([sys.executable, "-m", "dept_worker.cli", *args], stdout=f, stderr=f, env=ENV)
    STARTED.append(proc)
    return proc


def kill_leftovers() -> None:
    """SIGKILL every started process that is still running."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def worker_digests(state_dir: Path) -> dict[int, str]:
    path = state_dir / "digests.jsonl"
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[int(row["version"])] = row["body_digest"]
    return out
