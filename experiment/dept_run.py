"""Run one DEPT variant for real: a dept-server and one dept-worker per source, as processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .config import ExperimentConfig

RUN_FILE = "run.json"  # written last, when every process exited cleanly
TRAINING_FIELDS = (
    "sources", "model", "rounds", "inner_steps", "batch_size", "seq_len", "vocab_size",
    "source_vocab_size", "lr", "tau", "seed", "eval_batches", "codec_up", "codec_down",
)  # fmt: skip


class RunFailedError(RuntimeError):
    """A server or worker process failed; the message names its log."""


@dataclass(frozen=True)
class DeptRun:
    """What one DEPT run left behind."""

    variant: str
    root: Path
    metrics_path: Path
    checkpoint_dir: Path
    worker_dirs: dict[str, Path]
    vocabs: dict[str, Path]  # tokenizer each source's worker used
    wall_s: float


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics JSONL file (a torn last line is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def process_env(threads: int) -> dict[str, str]:
    """The environment of every process launched: fixed thread counts, unbuffered output."""
    t = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, PYTHONUNBUFFERED="1", PYTHONHASHSEED="0")


def _start_server(args: list[str], log: IO[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dept_server.cli", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RunFailedError(f"dept-server exited with {proc.wait()} before listening; see {log.name}")
    return proc, int(json.loads(line)["port"])


def run_dept(
    config: ExperimentConfig,
    variant: str,
    *,
    global_vocab: Path,
    source_vocabs: dict[str, Path],
    out: Path,
    echo: Callable[[str], None],
    started: float,
    worker_flags: tuple[str, ...] = (),
    worker_server: Callable[[str, int], str] | None = None,
) -> DeptRun:
    """Train ``variant`` on every source through dept-server and dept-worker; wait for the end.

    Args:
        config: the experiment.
        variant: glob, trim, spec or spec-opt.
        global_vocab: the global tokenizer (server and workers of glob, trim, spec).
        source_vocabs: per-source tokenizers (spec-opt).
        out: this run's folder (metrics.jsonl, checkpoints/, workers/SOURCE, logs/).
        echo: progress output, one line per round.
        started: the experiment's start (monotonic), for elapsed times.
        worker_flags: more dept-worker flags, the same for every worker (e.g. ``--overlap``).
        worker_server: (source, server port) -> the address that source's worker connects to
            (e.g. a link emulator in front of the server); default ``127.0.0.1:PORT``.

    Raises:
        RunFailedError: a process exited with an error.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).unlink(missing_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    env = process_env(config.threads)
    server_args = [
        "--port", "0", "--rounds", str(config.rounds), "--workers", str(len(config.sources)),
        "--variant", variant, "--model", config.model, "--seed", str(config.seed),
        "--codec-up", config.codec_up, "--codec-down", config.codec_down, "--metrics-path", str(metrics),
        "--checkpoint-dir", str(out / "checkpoints"), "--round-timeout", "3600",
    ]  # fmt: skip
    if variant != "spec-opt":
        server_args += ["--vocab", str(global_vocab)]
    vocabs = {s: source_vocabs[s] if variant == "spec-opt" else global_vocab for s in config.sources}
    run_started = time.monotonic()
    worker_dirs: dict[str, Path] = {}
    with open(logs / "server.log", "w", encoding="utf-8") as server_log:
        server, port = _start_server(server_args, server_log, env)
        workers: list[tuple[str, subprocess.Popen[bytes], IO[str]]] = []
        try:
            for source in config.sources:
                worker_dirs[source] = out / "workers" / source
                address = worker_server(source, port) if worker_server else f"127.0.0.1:{port}"
                args = [
                    "--server", address, "--source", source, "--vocab", str(vocabs[source]),
                    "--inner-steps", str(config.inner_steps), "--batch-size", str(config.batch_size),
                    "--seq-len", str(config.seq_len), "--lr", str(config.lr), "--seed", str(config.seed),
                    "--eval-batches", str(config.eval_batches), "--state-dir", str(worker_dirs[source]),
                    *worker_flags,
                ]  # fmt: skip
                log = open(logs / f"worker-{source}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
                cmd = [sys.executable, "-m", "dept_worker.cli", *args]
                workers.append((source, subprocess.Popen(cmd, stdout=log, stderr=log, env=env), log))
            _follow(config, variant, metrics, server, workers, echo, started)
            codes = {source: p.wait() for source, p, _ in workers}
            if any(codes.values()):
                server.terminate()
            server_out, _ = server.communicate(timeout=300)
            (logs / "server.stdout").write_text(server_out or "", encoding="utf-8")
        finally:
            for _, p, wlog in workers:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                wlog.close()
            if server.poll() is None:
                server.kill()
                server.wait()
    if server.returncode != 0 or any(codes.values()):
        raise RunFailedError(f"{variant}: server exit {server.returncode}, workers {codes}; logs in {logs}")
    wall_s = time.monotonic() - run_started
    stamp = {
        "variant": variant,
        "training": training_fields(config),
        "vocabs": {s: str(p) for s, p in vocabs.items()},
    }
    (out / RUN_FILE).write_text(json.dumps({**stamp, "wall_s": wall_s}, indent=1), encoding="utf-8")
    return DeptRun(
        variant=variant,
        root=out,
        metrics_path=metrics,
        checkpoint_dir=out / "checkpoints",
        worker_dirs=worker_dirs,
        vocabs=vocabs,
        wall_s=wall_s,
    )


def training_fields(config: ExperimentConfig) -> dict[str, Any]:
    """The settings that decide what a run trains (not how it is evaluated)."""
    d = config.to_dict()
    return {k: d[k] for k in TRAINING_FIELDS}


def finished_run(config: ExperimentConfig, variant: str, out: Path) -> DeptRun | None:
    """The run already in ``out`` if it finished with these training settings (``--reuse``)."""
    try:
        stamp = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stamp.get("variant") != variant or stamp.get("training") != json.loads(
        json.dumps(training_fields(config))
    ):
        return None
    return DeptRun(
        variant=variant,
        root=out,
        metrics_path=out / "metrics.jsonl",
        checkpoint_dir=out / "checkpoints",
        worker_dirs={s: out / "workers" / s for s in config.sources},
        vocabs={s: Path(p) for s, p in stamp["vocabs"].items()},
        wall_s=float(stamp["wall_s"]),
    )


def _follow(
    config: ExperimentConfig,
    variant: str,
    metrics: Path,
    server: subprocess.Popen[str],
    workers: list[tuple[str, subprocess.Popen[bytes], IO[str]]],
    echo: Callable[[str], None],
    started: float,
) -> None:
    """Print one line per closed round until every process has exited (or a worker failed)."""
    seen = 0
    while server.poll() is None or any(p.poll() is None for _, p, _ in workers):
        for rec in read_records(metrics)[seen:]:
            seen += 1
            if rec.get("kind") == "final":
                continue
            bpb = [e["bits_per_byte"] for e in rec.get("eval", {}).values() if "bits_per_byte" in e]
            mean = f"{sum(bpb) / len(bpb):.3f}" if bpb else "–"
            echo(
                f"  [{variant}] round {rec['round'] + 1}/{config.rounds}: val bits/byte before it {mean},"
                f" up {rec['up_payload_bytes']:,} B, down {rec['down_payload_bytes']:,} B"
                f" ({time.monotonic() - started:.0f} s)"
            )
        if any(p.poll() not in (None, 0) for _, p, _ in workers):
            return
        time.sleep(0.5)
