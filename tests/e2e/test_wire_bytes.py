"""The payload bytes the server reports agree with the bytes that crossed the TCP connections."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import SOURCES
from tests.e2e.harness import (
    EXIT_S,
    MARGIN_S,
    RUN_S,
    START_S,
    Server,
    describe,
    records,
    start_worker,
    wait_workers,
)
from tests.e2e.test_rounds import server_args, worker_args
from tests.faults.proxy import TcpProxy

pytestmark = pytest.mark.slow


@pytest.mark.timeout(START_S + RUN_S + EXIT_S + MARGIN_S)
def test_reported_payload_matches_tcp_bytes(global_vocab: Path, tmp_path: Path) -> None:
    # The 'small' body (~12 MiB in fp32) makes per-call HTTP/2 headers a rounding error, as on a real run.
    args = server_args("spec", global_vocab, tmp_path, rounds=2)
    args[args.index("tiny")] = "small"
    server = Server(args, tmp_path / "server.log")
    with TcpProxy("127.0.0.1", server.port) as proxy:
        workers = []
        for source in SOURCES:
            wargs = worker_args(proxy.port, source, global_vocab, tmp_path)
            wargs[wargs.index("3")] = "1"  # one inner step: this test is about bytes, not learning
            workers.append(start_worker(wargs, tmp_path / f"{source}.log"))
        wait_workers(workers, RUN_S)
        assert server.wait(EXIT_S) == 0, describe()
        up_tcp, down_tcp = proxy.counts.up, proxy.counts.down
    recs = records(tmp_path / "metrics.jsonl")
    up_reported = sum(r.get("up_payload_bytes", 0) for r in recs)
    down_reported = sum(r.get("down_payload_bytes", 0) for r in recs)
    assert up_reported > 1_000_000 and down_reported > 1_000_000
    assert abs(up_tcp - up_reported) / up_tcp < 0.05, (up_tcp, up_reported)
    assert abs(down_tcp - down_reported) / down_tcp < 0.05, (down_tcp, down_reported)
