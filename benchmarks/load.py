"""Load: one real dept-server process on loopback and many simulated workers (threads of this
process, one gRPC channel each), the server's resident set measured from /proc.

Each run starts ``dept_bench.load_server`` (the real ServerApp, servicer, gRPC server, int8
codecs, staging and commit path) on a synthetic body, reads its idle RSS once it serves, clears
its high-water mark (``/proc/PID/clear_refs``), then lets ``workers`` simulated workers run
``rounds`` rounds: join, pull (the full body first, then the encoded update), push an int8
update and commit it. Workers are well-behaved: they poll ``WaitRound`` without blocking
(``timeout_ms=0``, every 0.5-1 s) so the server's RPC pool is never held by long polls. The
update is the same encoded payload for every worker (encoded once here, framed per upload).

Reported per run: ``round_s`` (the last round, from its first pull to the commit that closed it),
``server_idle_rss_mib`` (after start-up, before any join), ``server_peak_rss_mib`` (the kernel's
high-water mark during the rounds), ``push_MBps``/``pull_MBps`` (all workers' bytes of the last
round over its push/pull span), ``folded`` (updates folded, from the server's metrics file).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dept_comm.channel import SESSION_METADATA_KEY, call_with_retry, open_channel
from dept_comm.codecs import get_codec
from dept_comm.frames import StreamItem, Undecodable, as_message, kind_of
from dept_comm.pb import service_pb2
from dept_comm.service import ParameterServerStub
from dept_comm.streaming import StreamOpenInfo, encode_stream

from .load_server import TENSOR_ELEMENTS

logger = logging.getLogger(__name__)

FULL_RUNS = ((8, 64), (32, 64), (64, 64), (128, 64), (8, 512))  # (workers, body MiB)
QUICK_RUNS = ((4, 8),)
ROUNDS = 2


def _proc_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@dataclass
class Span:
    """Start/end times and bytes of one kind of call in one round, over all workers."""

    start: float = float("inf")
    end: float = 0.0
    nbytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, start: float, end: float, nbytes: int) -> None:
        with self.lock:
            self.start, self.end, self.nbytes = (
                min(self.start, start),
                max(self.end, end),
                self.nbytes + nbytes,
            )

    def mbps(self) -> float:
        return self.nbytes / 1e6 / max(self.end - self.start, 1e-9)


class Update:
    """One int8-encoded update of the synthetic body, framed anew for each upload."""

    def __init__(self, body_mib: int, codec: str) -> None:
        count = max(1, (body_mib << 20) // (4 * TENSOR_ELEMENTS))
        self.codec = get_codec(codec)
        gen = torch.Generator().manual_seed(1)
        shape = (TENSOR_ELEMENTS // 1024, 1024)
        x = torch.randn(shape, generator=gen).mul_(1e-3)
        payload = self.codec.encode(x)  # one tensor's payload serves every tensor: same shape
        self.shapes = {f"body.layers.{i:04d}.weight": torch.zeros(1).expand(shape) for i in range(count)}
        self.payload = payload

    def frames(self, info: StreamOpenInfo) -> Iterator[StreamItem]:
        return encode_stream(
            self.shapes, open_info=info, codec=self.codec, encoder=lambda name, t, c: self.payload
        )


class SimWorker(threading.Thread):
    def __init__(self, idx: int, target: str, update: Update, spans: list[dict[str, Span]]) -> None:
        super().__init__(name=f"sim-{idx}", daemon=True)
        self.name_ = f"sim-{idx:04d}"
        self.target, self.update, self.spans = target, update, spans
        self.error: BaseException | None = None
        self.session: tuple[tuple[str, str], ...] = ()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # reported by the driver
            self.error = err

    def _wait_round(self, stub: ParameterServerStub, wid: str, after: int) -> service_pb2.RoundInfo:
        while True:
            info = stub.WaitRound(
                service_pb2.WaitRoundRequest(worker_id=wid, round_idx=max(after, 0), timeout_ms=0),
                timeout=60,
                metadata=self.session,
            )
            if info.round_idx > after or info.state == service_pb2.RUN_STATE_FINISHED:
                return info
            time.sleep(0.5 + random.random() * 0.5)

    def _run(self) -> None:
        channel = open_channel(self.target)
        stub = ParameterServerStub(channel)
        reply = stub.Join(service_pb2.JoinRequest(source_id=self.name_, worker_name=self.name_), timeout=600)
        wid = reply.worker_id
        # Every call after Join carries the session credential it issued (dept_comm/server/sessions.py).
        self.session = ((SESSION_METADATA_KEY, reply.session),)
        md = self.session
        version = -1
        for r in range(len(self.spans)):
            if r > 0:
                self._wait_round(stub, wid, r - 1)
            t0 = time.monotonic()
            request = service_pb2.PullRequest(worker_id=wid, have_version=max(version, 0), full=version < 0)

            def pull(request: service_pb2.PullRequest = request) -> tuple[int, Any]:
                nbytes, opened = 0, None
                for msg in stub.PullBody(request, metadata=md):
                    nbytes += msg.ByteSize()
                    if kind_of(msg) == "open" and not isinstance(msg, Undecodable):
                        opened = as_message(msg).open
                return nbytes, opened

            # A refusal over the server's --max-streams is retried after its hint, as workers do.
            nbytes, opened = call_with_retry(pull)
            assert opened is not None
            self.spans[r]["pull"].add(t0, time.monotonic(), nbytes)
            version = opened.target_version
            info = StreamOpenInfo(
                upload_id=f"{self.name_}-r{r}",
                sender_id=wid,
                round_idx=r,
                base_version=opened.target_version,
                base_digest=opened.target_digest,
                is_delta=True,
            )
            sent = [0]
            commit: list[Any] = []

            def counted(
                it: Iterator[StreamItem], sent: list[int] = sent, commit: list[Any] = commit
            ) -> Iterator[StreamItem]:
                for m in it:
                    if kind_of(m) == "commit":
                        commit.append(as_message(m).commit)
                        continue
                    sent[0] += m.ByteSize()
                    yield m

            def push(info: StreamOpenInfo = info, sent: list[int] = sent, commit: list[Any] = commit) -> None:
                sent[0] = 0  # a retry sends the same upload again
                commit.clear()
                stub.PushUpdate(counted(self.update.frames(info)), timeout=3600, metadata=md)

            t0 = time.monotonic()
            call_with_retry(push)
            self.spans[r]["push"].add(t0, time.monotonic(), sent[0])
            t_commit = time.monotonic()
            stub.CommitUpdate(
                service_pb2.CommitUpdateRequest(commit=commit[0], worker_id=wid, round_idx=r, num_tokens=1),
                timeout=3600,
                metadata=md,
            )
            self.spans[r]["commit"].add(t_commit, time.monotonic(), 0)
            self.spans[r]["round"].add(t0, time.monotonic(), 0)
        self._wait_round(stub, wid, len(self.spans) - 1)
        stub.Leave(service_pb2.LeaveRequest(worker_id=wid, reason="done"), timeout=60, metadata=md)
        channel.close()


def run_one(
    workers: int,
    body_mib: int,
    *,
    codec: str = "int8",
    rounds: int = ROUNDS,
    staging_memory_mib: int | None = None,
) -> dict[str, Any]:
    """One load run; the server is its own process, its RSS read from /proc."""
    with tempfile.TemporaryDirectory(prefix="dept-load-") as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        cmd = [
            sys.executable, "-m", "dept_bench.load_server", "--body-mib", str(body_mib),
            "--workers", str(workers), "--rounds", str(rounds), "--codec", codec,
            "--metrics-path", str(metrics), "--staging-dir", str(Path(tmp) / "staging"),
        ]  # fmt: skip
        if staging_memory_mib is not None:
            cmd += ["--staging-memory-mib", str(staging_memory_mib)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            port = json.loads(proc.stdout.readline())["port"]
            time.sleep(1.0)
            idle_kib = _proc_kib(proc.pid, "VmRSS")
            with open(f"/proc/{proc.pid}/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset VmHWM: the peak from here on, start-up's excluded
            update = Update(body_mib, codec)
            spans = [{k: Span() for k in ("pull", "push", "commit", "round")} for _ in range(rounds)]
            sims = [SimWorker(i, f"127.0.0.1:{port}", update, spans) for i in range(workers)]
            for s in sims:
                s.start()
            peak_kib = idle_kib
            samples: list[tuple[float, int]] = []
            while any(s.is_alive() for s in sims):
                peak_kib = max(peak_kib, _proc_kib(proc.pid, "VmHWM"))
                samples.append((time.monotonic(), _proc_kib(proc.pid, "VmRSS")))
                time.sleep(0.1)
            peak_kib = max(peak_kib, _proc_kib(proc.pid, "VmHWM"))
            errors = [repr(s.error) for s in sims if s.error is not None]
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    folded = sum(int(r.get("num_workers", 0)) for r in records if r.get("kind") != "final")
    last = spans[-1]

    def phase_mib(span: Span) -> float:  # the highest RSS sampled while calls of this kind ran
        inside = [kib for t, kib in samples if span.start <= t <= span.end]
        return round(max(inside, default=0) / 1024, 1)

    phases = {f"r{r}_{k}": phase_mib(sp[k]) for r, sp in enumerate(spans) for k in ("pull", "push", "commit")}
    return {
        "workers": workers,
        "body_mib": body_mib,
        "codec": codec,
        "rounds": rounds,
        "round_s": round(last["round"].end - last["pull"].start, 3),
        "first_round_s": round(spans[0]["round"].end - spans[0]["pull"].start, 3),
        "server_idle_rss_mib": round(idle_kib / 1024, 1),
        "server_peak_rss_mib": round(peak_kib / 1024, 1),
        "peak_minus_idle_x_body": round((peak_kib - idle_kib) / 1024 / body_mib, 2),
        "push_MBps": round(last["push"].mbps(), 1),
        "pull_MBps": round(last["pull"].mbps(), 1),
        "full_pull_MBps": round(spans[0]["pull"].mbps(), 1),
        "folded": folded,
        "expected_folds": workers * rounds,
        "staging_memory_mib": staging_memory_mib if staging_memory_mib is not None else "auto",
        "rss_mib_by_phase": phases,
        "errors": errors[:5],
    }


def run(
    quick: bool = False, runs: str | None = None, staging_memory_mib: int | None = None
) -> dict[str, Any]:
    """Every configured run, one after another (so their memory never adds up)."""
    todo: tuple[tuple[int, int], ...] = QUICK_RUNS if quick else FULL_RUNS
    if runs:
        pairs = [item.split("x") for item in runs.split(",")]
        todo = tuple((int(w), int(b)) for w, b in pairs)
    out = []
    for workers, body_mib in todo:
        logger.info("load run workers=%d body_mib=%d", workers, body_mib)
        out.append(run_one(workers, body_mib, staging_memory_mib=staging_memory_mib))
        logger.info("load result %s", json.dumps(out[-1]))
    return {"runs": out, "cpu_count": os.cpu_count()}
