"""Hard kills (SIGKILL) at random moments of a save loop never leave the checkpoints unloadable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dept_comm.checkpoint import CheckpointStore

NUM_KILLS = 30

# A zygote: imports torch once (slow here), then forks one save-loop child per "go" line, so each
# kill costs milliseconds instead of an interpreter start. The children run the real store code.
ZYGOTE = r"""
import os, sys
import torch
from dept_comm.checkpoint import CheckpointStore

def groups(step):
    gen = torch.Generator().manual_seed(step)
    return {
        "body": {"w": torch.randn(256, 64, generator=gen), "b": torch.full((64,), float(step))},
        "embeddings": {"e": torch.randn(128, 64, generator=gen)},
        "outer": {"m": torch.randn(256, 64, generator=gen)},
    }

def save_forever(directory):
    store = CheckpointStore(directory, keep=2)
    last = store.latest()
    step = 0 if last is None else last.step + 1
    while True:
        store.save(step, groups(step), {"step": step})
        step += 1

for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            save_forever(sys.argv[1])
        finally:
            os._exit(3)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


def _expected(step: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    return {
        "body": {"w": torch.randn(256, 64, generator=gen), "b": torch.full((64,), float(step))},
        "embeddings": {"e": torch.randn(128, 64, generator=gen)},
        "outer": {"m": torch.randn(256, 64, generator=gen)},
    }


def test_sigkill_during_saves_never_corrupts_latest(tmp_path: Path) -> None:
    rng = random.Random(1234)
    directory = tmp_path / "ckpt"
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    best = -1
    try:
        for _ in range(NUM_KILLS):
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.02, 0.2))  # a random moment, not a timing assertion
            os.kill(pid, signal.SIGKILL)
            status = int(zygote.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status  # still saving
            with CheckpointStore(directory) as store:
                ckpt = store.latest()
            if best >= 0:
                assert ckpt is not None, "a checkpoint existed before this kill"
            if ckpt is None:
                continue
            assert ckpt.step >= best, (ckpt.step, best)  # never goes backwards
            best = ckpt.step
            assert ckpt.meta == {"step": ckpt.step}
            expected = _expected(ckpt.step)
            for group, tensors in expected.items():
                for name, t in tensors.items():
                    assert torch.equal(ckpt.tensors[group][name], t), (ckpt.step, group, name)
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert best >= 5, f"only {best + 1} steps were saved across {NUM_KILLS} runs: the kills tested little"
    assert not [p for p in directory.rglob("*") if ".tmp-" in p.name]
