"""Start real dept-server / dept-worker processes for end-to-end tests, and wait on them honestly.

Every wait polls for its condition until a deadline and, on expiry, raises an AssertionError that
says what it saw: each started process's exit code and the tail of its log, and the metrics
records written so far. Tests mark themselves ``pytest.mark.timeout`` above the sum of the waits
they can make (see the ``*_S`` constants), so the harness's diagnosis fires before pytest's.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.faults.proxy import ByteCount, TcpProxy

# Deadlines (seconds) of the harness's waits; a test's timeout mark must exceed the sum it uses.
START_S = 60.0  # a server prints its port (imports torch and builds the model first)
RUN_S = 180.0  # workers finish a short run (2-4 rounds of a tiny model)
EXIT_S = 60.0  # a server exits once its workers left (final evaluation, summary)
MARGIN_S = 30.0  # what a test does besides waiting (tokenizers, file checks)
LOG_TAIL_LINES = 25

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")


@dataclass
class Started:
    """A process a test started, with the log its output goes to."""

    proc: subprocess.Popen[Any]
    name: str
    log: Path


# Every process a test starts, so that a failing test leaves none running (see conftest) and a
# failed wait can show them all.
STARTED: list[subprocess.Popen[Any]] = []
_SEEN: list[Started] = []
_METRICS: list[Path] = []


def _register(proc: subprocess.Popen[Any], name: str, log: Path) -> None:
    STARTED.append(proc)
    _SEEN.append(Started(proc, name, log))


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log ("(no log)" if it does not exist)."""
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def describe() -> str:
    """Every process started in this test (exit code or running, log tail) and the metrics so far."""
    parts = []
    for s in _SEEN:
        code = s.proc.poll()
        state = "running" if code is None else f"exit code {code}"
        parts.append(f"--- {s.name} (pid {s.proc.pid}, {state}), {s.log}:\n{log_tail(s.log)}")
    for path in _METRICS:
        recs = records(path)
        summary = [(r.get("kind", "round"), r.get("round"), r.get("num_workers")) for r in recs]
        parts.append(f"--- {path}: {len(recs)} records (kind, round, num_workers): {summary}")
    return "\n".join(parts) if parts else "(no process started)"


def _args_value(args: Sequence[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


class Server:
    """A dept-server process; its first stdout line gives the bound port (within ``start_timeout``)."""

    def __init__(
        self,
        args: list[str],
        log: Path,
        *,
        start_timeout: float = START_S,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.log = log
        self.args = list(args)
        self._log_f = open(log, "a")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dept_server.cli", *args],
            stdout=subprocess.PIPE,
            stderr=self._log_f,
            text=True,
            env=dict(env) if env is not None else ENV,
        )
        _register(self.proc, "dept-server", log)
        metrics = _args_value(args, "--metrics-path")
        self.metrics_path = Path(metrics) if metrics is not None else None
        if self.metrics_path is not None and self.metrics_path not in _METRICS:
            _METRICS.append(self.metrics_path)
        info = json.loads(self._first_line(start_timeout))
        self.port: int = info["port"]
        self.metrics_port: int | None = info.get("metrics_port")

    def _first_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"dept-server printed no port within {timeout:.0f} s\n{describe()}")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=EXIT_S)
            raise AssertionError(f"dept-server exited with {code} before listening\n{describe()}")
        return line

    def wait(self, timeout: float = EXIT_S) -> int:
        """The server's exit code once it exits; AssertionError with the diagnosis after ``timeout``."""
        code = wait_exit(self.proc, timeout, "dept-server to exit")
        self._log_f.close()
        return code

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone (its sockets and locks are released)."""
        self.proc.kill()
        self.proc.wait()
        self._log_f.close()


def start_worker(
    args: list[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    f = open(log, "a")  # noqa: SIM115 (inherited by the child; closed with the test process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dept_worker.cli", *args],
        stdout=f,
        stderr=f,
        env=dict(env) if env is not None else ENV,
        cwd=cwd,
    )
    name = _args_value(args, "--name") or _args_value(args, "--source") or "?"
    _register(proc, f"dept-worker {name}", log)
    return proc


def kill_leftovers() -> None:
    """SIGKILL every started process that is still running, and forget this test's processes."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _SEEN.clear()
    _METRICS.clear()


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    alive: Iterable[subprocess.Popen[Any]] = (),
    poll_s: float = 0.2,
) -> None:
    """Poll ``predicate`` until it is true; after ``timeout`` raise an AssertionError with what was seen.

    ``alive``: processes that must keep running meanwhile; one that exits first fails the wait at
    once (no point waiting out the deadline for a condition a dead process cannot bring about).
    """
    watched = list(alive)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        dead = [p for p in watched if p.poll() is not None]
        if dead:
            codes = ", ".join(f"pid {p.pid} exit {p.returncode}" for p in dead)
            raise AssertionError(f"while waiting for {what}, a process exited ({codes})\n{describe()}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{describe()}")
        time.sleep(poll_s)


def wait_exit(proc: subprocess.Popen[Any], timeout: float, what: str = "a process to exit") -> int:
    """The exit code of ``proc``; AssertionError with the diagnosis if it still runs after ``timeout``."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{describe()}") from None


def wait_workers(
    workers: Mapping[str, subprocess.Popen[Any]] | Sequence[subprocess.Popen[Any]],
    timeout: float = RUN_S,
    expect: int = 0,
) -> None:
    """Wait for every worker to exit within one shared deadline; each must exit with ``expect``.

    A failure names the worker and shows every process's log tail (its own included).
    """
    named = dict(workers) if isinstance(workers, Mapping) else {str(p.pid): p for p in workers}
    deadline = time.monotonic() + timeout
    for name, proc in named.items():
        code = wait_exit(proc, max(0.0, deadline - time.monotonic()), f"worker {name} to exit")
        if code != expect:
            raise AssertionError(f"worker {name} exited with {code}, expected {expect}\n{describe()}")


def run_cli(
    args: list[str], timeout: float = START_S, module: str = "dept_server.cli"
) -> subprocess.CompletedProcess[str]:
    """Run a CLI to completion (stdout and stderr captured); AssertionError if it outlives ``timeout``."""
    try:
        return subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(
            f"{module} {' '.join(args)} still ran after {timeout:.0f} s; output so far:\n"
            f"{err.stdout!r}\n{err.stderr!r}"
        ) from None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener can bind ``host:port`` now (SO_REUSEADDR, as gRPC binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_port_free(port: int, timeout: float = 30.0) -> None:
    """Poll until ``port`` can be bound again (e.g. after a SIGKILLed server's sockets are torn down)."""
    wait_for(lambda: port_is_free(port), timeout, f"port {port} to be free to bind")


def worker_digests(state_dir: Path) -> dict[int, str]:
    path = state_dir / "digests.jsonl"
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[int(row["version"])] = row["body_digest"]
    return out


class ThrottledCount(ByteCount):
    """A proxy's byte counter that lets each connection's client-to-server bytes through at
    ``up_bytes_per_s`` at most.

    The proxy counts each piece it read before forwarding it; blocking here until the piece's
    turn comes holds the forwarding back, so an upload streams no faster than this rate. Each
    connection is pumped by its own thread, which keys its own budget: a new connection (a
    Leave on a fresh channel, say) does not queue behind a throttled upload.
    """

    def __init__(self, up_bytes_per_s: float) -> None:
        super().__init__()
        self.rate = up_bytes_per_s
        self._pump = threading.local()  # per pump thread: when its next piece may go

    def add(self, direction: str, n: int) -> None:
        if direction == "up":
            now = time.monotonic()
            start = max(getattr(self._pump, "next", now), now)
            self._pump.next = start + n / self.rate
            if start > now:
                time.sleep(start - now)
        super().add(direction, n)


def throttled_proxy(target_port: int, up_bytes_per_s: float) -> TcpProxy:
    """A TcpProxy to 127.0.0.1:``target_port`` whose up direction runs at ``up_bytes_per_s``."""
    proxy = TcpProxy("127.0.0.1", target_port)
    proxy.counts = ThrottledCount(up_bytes_per_s)
    return proxy
