"""A hard kill (SIGKILL) at any point of a save leaves the newest verifying checkpoint loadable.

No timing: a child process saves the server's checkpoint groups in a loop and stops before every
file-system step of a save (each write, the first one storing half the file, fsync, rename, unlink, mkdir,
rmdir) to report it and wait for the parent's go-ahead. The parent lets the child finish one
whole save, then SIGKILLs it at the k-th step of its next save, for k = 0, 1, 2, ... until that
save has no k-th step: every step of a save is a kill point once. After each kill the store must
load the save just killed if its manifest was renamed into place, else the one before, with
exactly the tensors saved for that step, and leave no temp file or uncommitted step behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from itertools import count
from pathlib import Path
from typing import IO

import pytest
import torch

from dept_comm.checkpoint import MANIFEST, CheckpointStore
from tests.fixtures.server_state import server_groups, shifted

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a child process per kill point

ROOT = Path(__file__).resolve().parents[3]
MAX_KILLS = 200  # a save has about 30 steps; more means the sweep never ends

# A zygote: imports torch and the server once, then forks one save-loop child per b"g" byte, so
# each kill costs a fork, not an interpreter start. The children run the real store code; only
# the os functions it calls are wrapped, to report and wait.
ZYGOTE = r"""
import os, sys
from dept_comm.checkpoint import CheckpointStore
from tests.fixtures.server_state import server_groups, shifted

BASE = server_groups()

def say(line):
    os.write(1, (line + "\n").encode())

def stop_point(name, *args):
    say("step " + name + " " + " ".join(os.path.basename(str(a)) for a in args if isinstance(a, (str, os.PathLike))))
    if os.read(0, 1) != b"c":
        os._exit(4)

def wrap(name):
    real = getattr(os, name)
    def wrapped(*args, **kwargs):
        stop_point(name, *args)
        return real(*args, **kwargs)
    setattr(os, name, wrapped)

def install():
    for name in ("replace", "unlink", "mkdir", "rmdir"):
        wrap(name)
    real_write, real_fsync, torn = os.write, os.fsync, set()
    def write(fd, data):
        if fd == 1:  # our own reports
            return real_write(fd, data)
        stop_point("write")
        if fd not in torn:  # a file's first write stores only half: a kill can leave it torn
            torn.add(fd)
            data = memoryview(data)[: max(1, len(data) // 2)]
        return real_write(fd, data)
    def fsync(fd):
        torn.discard(fd)
        return real_fsync(fd)
    os.write, os.fsync = write, fsync
    wrap("fsync")

def save_forever(directory):
    store = CheckpointStore(directory, keep=2)
    last = store.latest()
    step = 0 if last is None else last.step + 1
    install()
    while True:
        say(f"begin {step}")
        store.save(step, shifted(BASE, step), {"step": step})
        say(f"end {step}")
        step += 1

while os.read(0, 1) == b"g":
    pid = os.fork()
    if pid == 0:
        try:
            say(f"pid {os.getpid()}")  # the child says it: the zygote's lines would race its own
            save_forever(sys.argv[1])
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    say(f"status {status}")
"""


def _read(out: IO[bytes], prefix: str) -> str:
    line = out.readline().decode()
    assert line.startswith(prefix), f"expected {prefix!r} from the save loop, got {line!r}"
    return line[len(prefix) :].strip()


def _kill_at(zygote: subprocess.Popen[bytes], k: int) -> tuple[int, list[str], bool]:
    """Fork a saver; let it finish one save, then kill it at step ``k`` of the next.

    Returns (the step being saved when killed, the steps it was let through, whether it finished
    that save without reaching step ``k``).
    """
    assert zygote.stdin is not None and zygote.stdout is not None
    zygote.stdin.write(b"g")
    zygote.stdin.flush()
    pid = int(_read(zygote.stdout, "pid "))
    saves, done, seen = 0, False, []
    step = -1
    while True:
        line = zygote.stdout.readline().decode().strip()
        kind, _, rest = line.partition(" ")
        if kind == "begin":
            step, saves, seen = int(rest), saves + 1, []
        elif kind == "end":
            if saves == 2:  # the whole second save went by: k is past its last step
                done = True
        elif kind == "step":
            if (saves == 2 and len(seen) == k) or done:
                break  # the child waits for us at this step: kill it there
            seen.append(rest)
            zygote.stdin.write(b"c")
            zygote.stdin.flush()
        else:
            raise AssertionError(f"unexpected line from the save loop: {line!r}")
    os.kill(pid, signal.SIGKILL)
    status = int(_read(zygote.stdout, "status "))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return step, seen, done


def _assert_loads(directory: Path, step: int) -> None:
    with CheckpointStore(directory) as store:  # opening removes the killed save's leftovers
        ckpt = store.latest()
    assert ckpt is not None and ckpt.step == step, (None if ckpt is None else ckpt.step, step)
    assert ckpt.meta == {"step": step}
    expected = shifted(server_groups(), step)
    assert ckpt.tensors.keys() == expected.keys()
    for group, tensors in expected.items():
        assert ckpt.tensors[group].keys() == tensors.keys()
        for name, t in tensors.items():
            got = ckpt.tensors[group][name]
            assert got.dtype == t.dtype and torch.equal(got, t), (step, group, name)
    assert not [p for p in directory.rglob("*") if ".tmp-" in p.name]
    assert all((p / MANIFEST).exists() for p in directory.glob("step-*")), "an uncommitted step was left"


def test_sigkill_at_every_step_of_a_save_never_corrupts_latest(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    kinds: set[str] = set()
    try:
        for k in count():
            assert k < MAX_KILLS, "the save never ran out of steps"
            step, seen, done = _kill_at(zygote, k)
            if done:
                break
            committed = any(s.startswith("replace ") and s.endswith(MANIFEST) for s in seen)
            _assert_loads(directory, step if committed else step - 1)
            kinds.update(s.split()[0] for s in seen)
    finally:
        assert zygote.stdin is not None
        zygote.stdin.close()  # the zygote's read returns b"": it exits
        zygote.wait(timeout=60)
    # Kills landed mid-write, before and after each fsync and rename, and inside the prune.
    assert k >= 25 and {"write", "fsync", "replace", "unlink", "mkdir", "rmdir"} <= kinds, (k, kinds)
