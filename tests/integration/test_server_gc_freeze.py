"""The server CLIs' loop (``dept_comm.server.run.run``) leaves start-up's objects out of the
garbage collector's scans (``gc.freeze``), in a child process each (freezing is process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import gc, json, threading
    import torch
    from dept_comm.server.config import ServerConfig
    from dept_comm.server.run import run, start_server

    config = ServerConfig(port=0, rounds=1, workers=1, codec_up="fp32", codec_down="fp32")
    running = start_server(config, {"w": torch.zeros(8)})
    before = gc.get_freeze_count()
    stop = threading.Event()
    stop.set()  # a stop already asked for: run serves, freezes first, then stops at once
    code = run(running, stop)
    print(json.dumps({"before": before, "after": gc.get_freeze_count(), "code": code}))
    """
)


def test_the_cli_loop_freezes_what_start_up_built() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == 0
    assert got["after"] > 1000  # torch, gRPC, the app: thousands of objects
    assert got["code"] == 0
