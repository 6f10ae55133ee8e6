"""``dept-bench overlap``: round wall time against compute time, with and without ``--overlap``.

Each run is a real ``dept-server`` and one real ``dept-worker`` process per source (the
experiment's ``run_dept``), every worker reaching the server through its own userspace link
emulator (``linkemu``: rate cap and one-way delay of RTT/2 both ways, all emulators in one helper
process). The same seeds, data and settings run once synchronously and once with
``dept-worker --overlap``; only that flag differs.

Per run, over the steady-state rounds 2..R (the first round pulls the whole initial body and
starts the processes):

- ``compute_s_per_round``: the worker's computation per round, its inner steps plus its
  validation pass (``train_s + eval_s`` on each worker's per-round log line; both run in every
  round, synchronous or not, and neither waits on the network), mean over rounds, of the slower
  worker (a per-round maximum would overstate it with overlap, where each worker's rounds run
  back to back and the slower one sets the pace); ``train_s_per_round`` and ``eval_s_per_round``
  are its two parts, for the same worker;
- ``comm_s_per_round``: the pull's plus the push's seconds (``pull_s + push_s`` on the same
  line; a push ends when the commit is acknowledged), mean over rounds, of the slower worker;
- ``round_wall_s_per_round``: the time between consecutive round closes on the server
  (``timestamp_unix_s`` of consecutive ``metrics.jsonl`` records), mean over rounds;
- ``wall_over_compute``: the ratio of the two means (``wall_over_train``: of the round wall time
  to the inner steps alone, the stricter figure this benchmark reported first); ``avg_val_bpb``:
  the workers' final validation bits per byte after the last round, mean over sources (the
  quality cost of the one-round delay is the difference between the two runs); ``link_bytes``:
  what crossed each worker's emulated link, up and down (every byte of the run went through the
  emulators).

Settings: the ``small`` model, 2 sources, 6 rounds of 8 inner steps, int8 both ways, 25 Mbit/s
at 40 ms RTT. ``--quick``: the ``tiny`` model, 4 rounds of 4 steps, 200 Mbit/s at 10 ms (a
smoke test of the plumbing; its ratios mean nothing).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import re
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from statistics import mean
from typing import Any

from dept_experiment.config import ExperimentConfig
from dept_experiment.dept_run import read_records, run_dept
from dept_model.tokenizer import build_tokenizers

from .codecs_quality import summarise
from .link import _recv
from .linkemu import LinkEmulator, LinkSpec

logger = logging.getLogger(__name__)

CONFIG = ExperimentConfig(
    preset="overlap",
    sources=("en", "it"),
    heldout=(),
    udhr=(),
    variants=("spec",),
    model="small",
    rounds=6,
    inner_steps=8,
    batch_size=8,
    seq_len=128,
    vocab_size=4096,
    lr=2e-3,
    eval_batches=2,
)
QUICK_CONFIG = CONFIG.replace(
    model="tiny", rounds=4, inner_steps=4, batch_size=4, seq_len=64, vocab_size=1024
)
LINK = (25.0, 40.0)  # rate Mbit/s, RTT ms
QUICK_LINK = (200.0, 10.0)

ROUND_LINE = re.compile(
    r"round=(?P<round>\d+) source=\S+ .* train_s=(?P<train>[\d.]+) pull_s=(?P<pull>[\d.]+) "
    r"push_s=(?P<push>[\d.]+) eval_s=(?P<eval>[\d.]+)"
)


def _emulators(control: Connection, targets: list[tuple[str, int]], spec: LinkSpec) -> None:
    """One link emulator per target (each worker its own access link); ports back, then wait."""
    with contextlib.ExitStack() as stack:
        emus = [stack.enter_context(LinkEmulator(t, spec)) for t in targets]
        control.send([e.port for e in emus])
        with contextlib.suppress(EOFError):
            control.recv()
            control.send([dict(e.bytes) for e in emus])  # what crossed each link, both ways


class _Links:
    """``connect(source, server_port) -> address`` for ``run_dept``: the first call starts the
    emulator process for ``n`` workers in front of that port; each source gets its own link."""

    def __init__(self, spec: LinkSpec, n: int) -> None:
        self.spec, self.n = spec, n
        self._ctx = mp.get_context("spawn")
        self._control, self._child = self._ctx.Pipe()
        self._proc: mp.process.BaseProcess | None = None
        self._ports: list[int] = []
        self._given: dict[str, int] = {}
        self.relayed: list[dict[str, int]] = []  # bytes each link carried (up, down), once closed

    def connect(self, source: str, port: int) -> str:
        if self._proc is None:
            targets = [("127.0.0.1", port)] * self.n
            self._proc = self._ctx.Process(target=_emulators, args=(self._child, targets, self.spec))
            self._proc.start()
            self._ports = _recv(self._control, "link emulators", 60)
        self._given.setdefault(source, self._ports[len(self._given)])
        return f"127.0.0.1:{self._given[source]}"

    def __enter__(self) -> _Links:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError, EOFError, TimeoutError):
                self._control.send("stop")
                self.relayed = _recv(self._control, "link emulators' byte counts", 30)
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.kill()


def worker_rounds(log: Path) -> dict[int, dict[str, float]]:
    """round -> {train_s, eval_s, comm_s} from one worker's per-round log lines."""
    out = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        m = ROUND_LINE.search(line)
        if m:
            out[int(m["round"])] = {
                "train_s": float(m["train"]),
                "eval_s": float(m["eval"]),
                "comm_s": float(m["pull"]) + float(m["push"]),
            }
    return out


def measure(metrics: Path, logs: dict[str, Path], sources: tuple[str, ...]) -> dict[str, Any]:
    """Per-round figures of one run (rounds 2..R; see the module docstring)."""
    records = read_records(metrics)
    closed = [r for r in records if r.get("kind") != "final"]
    if len(closed) < 2:
        raise ValueError(f"{metrics}: {len(closed)} rounds closed, need 2 or more")
    stamps = [float(r["timestamp_unix_s"]) for r in closed]
    steady = [r["round"] for r in closed[1:]]
    per_worker = {source: worker_rounds(log) for source, log in logs.items()}
    missing = [(s, r) for s, w in per_worker.items() for r in steady if r not in w]
    if missing:
        raise ValueError(
            f"no round line for (worker, round) {missing[:4]} in {[str(p) for p in logs.values()]}"
        )
    keys = ("train_s", "eval_s", "comm_s")
    series = {s: {k: [w[r][k] for r in steady] for k in keys} for s, w in per_worker.items()}
    slower = max(series, key=lambda s: mean(series[s]["train_s"]) + mean(series[s]["eval_s"]))
    train, evaluation = mean(series[slower]["train_s"]), mean(series[slower]["eval_s"])
    compute = train + evaluation
    comm = max(mean(v["comm_s"]) for v in series.values())
    wall = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "rounds": len(closed),
        "compute_s_per_round": round(compute, 3),
        "train_s_per_round": round(train, 3),
        "eval_s_per_round": round(evaluation, 3),
        "comm_s_per_round": round(comm, 3),
        "round_wall_s_per_round": round(mean(wall), 3),
        "wall_over_compute": round(mean(wall) / compute, 3),
        "wall_over_train": round(mean(wall) / train, 3),
        "comm_over_compute": round(comm / compute, 3),
        "avg_val_bpb": round(summarise(records, sources)["avg_val_bpb"], 5),
        "round_wall_s": [round(x, 3) for x in wall],
        "workers": {s: {k: [round(x, 3) for x in v] for k, v in d.items()} for s, d in series.items()},
    }


def run(quick: bool = False) -> dict[str, Any]:
    config = QUICK_CONFIG if quick else CONFIG
    rate_mbit, rtt_ms = QUICK_LINK if quick else LINK
    spec = LinkSpec(rate_bps=rate_mbit * 1e6, delay_s=rtt_ms / 2e3)
    started = time.monotonic()
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dept-overlap-") as tmp:
        root = Path(tmp)
        vocab = build_tokenizers(
            list(config.sources), vocab_size=config.vocab_size, out_dir=root / "tok", per_source=False
        )["global"]
        for overlap in (False, True):
            out = root / ("overlap" if overlap else "sync")
            t0 = time.monotonic()
            with _Links(spec, len(config.sources)) as links:
                dept = run_dept(
                    config,
                    "spec",
                    global_vocab=vocab,
                    source_vocabs={},
                    out=out,
                    echo=lambda line: logger.info("%s", line),
                    started=started,
                    worker_flags=("--overlap",) if overlap else (),
                    worker_server=links.connect,
                )
            logs = {s: out / "logs" / f"worker-{s}.log" for s in config.sources}
            row = {
                "overlap": overlap,
                "rate_mbit": rate_mbit,
                "rtt_ms": rtt_ms,
                "codec": config.codec_up,
                **measure(dept.metrics_path, logs, config.sources),
                "link_bytes": links.relayed,
                "run_wall_s": round(time.monotonic() - t0, 1),
            }
            logger.info("overlap %s", row)
            rows.append(row)
    sync, over = rows
    return {
        "benchmark": "overlap",
        "config": {k: v for k, v in config.to_dict().items() if k not in ("heldout", "udhr", "variants")},
        "emulator": "userspace (dept_bench.linkemu), one link per worker",
        "compute_is": "the slower worker's mean train_s + eval_s over rounds 2..R (worker log: inner steps"
        " and validation pass)",
        "comm_is": "the slower worker's mean pull_s + push_s over rounds 2..R (worker log)",
        "round_wall_is": "difference of consecutive rounds' timestamp_unix_s (server metrics.jsonl)",
        "bpb_overlap_vs_sync": round(over["avg_val_bpb"] / sync["avg_val_bpb"] - 1, 5),
        "load_average_before_after": [load_before, [round(x, 2) for x in os.getloadavg()]],
        "cpus": os.cpu_count(),
        "runs": rows,
        "wall_s": round(time.monotonic() - started, 1),
    }
