"""The load benchmark's server process: the real dept-server (dept_comm.server's ServerApp with DEPT's hooks, servicer, gRPC server,
codecs, staging and commit path) on loopback, started on a synthetic body of a given size.

Run by ``dept_bench.load`` as ``python -m dept_bench.load_server --body-mib N ...``; prints one JSON
line ``{"port": P}`` once it serves, then runs its rounds and exits after the workers left.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

import torch

from dept_comm.memory import keep_freed_memory
from dept_comm.server.run import freeze_startup_heap, tune_malloc
from dept_server.config import ServerConfig  # type: ignore[import-not-found]  # mypy checks server/ as "server"
from dept_server.initial import describe_run  # type: ignore[import-not-found]
from dept_server.serve import start_dept_server  # type: ignore[import-not-found]

TENSOR_ELEMENTS = 1 << 20  # 4 MiB fp32 tensors (the 125m preset's are 2.4-9.4 MB)


def synthetic_body(body_mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``body_mib`` MiB of fp32 tensors named like a body's, each ``TENSOR_ELEMENTS`` elements
    (1024 columns), random normal * 0.02 from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    count = max(1, (body_mib << 20) // (4 * TENSOR_ELEMENTS))
    return {
        f"body.layers.{i:04d}.weight": torch.randn(TENSOR_ELEMENTS // 1024, 1024, generator=gen).mul_(0.02)
        for i in range(count)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--body-mib", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--staging-memory-mib", type=int, default=None)  # None: the server's default
    parser.add_argument("--staging-dir", type=Path, default=None)
    parser.add_argument("--metrics-path", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tune_malloc()  # as dept-server's CLI does
    if os.environ.get("DEPT_LOAD_CHECK_AT_COMMIT"):  # an experiment: no check as each tensor arrives
        from dept_comm.server.uploads import UploadPath

        UploadPath.check_on_arrival = False
    if os.environ.get("DEPT_LOAD_ARENAS"):  # profiling: the malloc arenas the server may use
        keep_freed_memory(max_arenas=int(os.environ["DEPT_LOAD_ARENAS"]))
    config = ServerConfig(
        port=0,
        rounds=args.rounds,
        workers=args.workers,
        variant="spec",
        model=f"synthetic-{args.body_mib}mib",
        codec_up=args.codec,
        codec_down=args.codec,
        round_timeout_s=3600.0,
        heartbeat_timeout_s=3600.0,
        metrics_path=args.metrics_path,
        staging_memory_mib=args.staging_memory_mib,
        staging_dir=args.staging_dir,
    )
    body = synthetic_body(args.body_mib)
    numel = sum(t.numel() for t in body.values())
    info = describe_run(
        config, body_params=numel, vocab_size=0, vocab_digest="", full_model_fp32_bytes=4 * numel
    )
    initial = (body, "", info)
    running = start_dept_server(config, initial)
    del body, initial
    if not os.environ.get("DEPT_NO_FREEZE"):  # an experiment: the collector scans everything
        freeze_startup_heap()  # as dept-server's CLI does (dept_comm.server.run.run)
    print(json.dumps({"port": running.port}), flush=True)
    app = running.app
    app.finished.wait()
    app.wait_all_left(120.0, stop=threading.Event())
    running.stop(5.0)  # the last Leave's reply goes out before the server stops
    return 0


if __name__ == "__main__":
    sys.exit(main())
