"""The wire benchmark's server process: the real dept-server (ServerApp, servicer, admission,
staging, down-link frames) on loopback, on a synthetic fp32 body of a given size.

Run by ``dept_bench.wire`` as ``python -m dept_bench.wire_server --body-mib N``; prints one JSON
line ``{"port": P}`` once it serves, and stops when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from dept_comm.grpc_env import transport
from dept_comm.memory import keep_freed_memory
from dept_comm.server.run import freeze_startup_heap, tune_malloc
from dept_server.config import ServerConfig  # type: ignore[import-not-found]  # mypy checks server/ as "server"
from dept_server.initial import describe_run  # type: ignore[import-not-found]
from dept_server.serve import start_dept_server  # type: ignore[import-not-found]

from .load_server import synthetic_body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--body-mib", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tune_malloc()  # as dept-server's CLI does
    threshold = os.environ.get("DEPT_WIRE_MMAP_THRESHOLD_MIB")  # an experiment: blocks below stay in the heap
    if threshold:
        keep_freed_memory(
            mmap_threshold_bytes=int(threshold) << 20, trim_threshold_bytes=1 << 30, max_arenas=2
        )
    if os.environ.get("DEPT_WIRE_CHECK_AT_COMMIT"):  # an experiment: no check as each tensor arrives
        from dept_comm.server.uploads import UploadPath

        UploadPath.check_on_arrival = False
    window_kib = os.environ.get("DEPT_WIRE_STREAM_WINDOW_KIB")  # an experiment: --stream-window-kib
    window = {"stream_window_kib": int(window_kib)} if window_kib else {}
    with tempfile.TemporaryDirectory(prefix="dept-wire-") as tmp:
        config = ServerConfig(
            port=0,
            rounds=1_000_000,
            workers=1,
            variant="spec",
            model=f"synthetic-{args.body_mib}mib",
            codec_up="fp32",
            codec_down="fp32",
            round_timeout_s=3600.0,
            heartbeat_timeout_s=3600.0,
            metrics_path=Path(tmp) / "metrics.jsonl",
            staging_memory_mib=4 * args.body_mib,  # uploads staged in memory, as a sized server does
            **window,
        )
        body = synthetic_body(args.body_mib)
        numel = sum(t.numel() for t in body.values())
        info = describe_run(
            config, body_params=numel, vocab_size=0, vocab_digest="", full_model_fp32_bytes=4 * numel
        )
        running = start_dept_server(config, (body, "", info))
        freeze_startup_heap()  # as dept-server's CLI does (dept_comm.server.run.run)
        del body, info
        print(json.dumps({"port": running.port, "grpc_transport": transport().describe()}), flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin (or dies)
        running.stop(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
