"""Pipelining: an int4 push + commit of a synthetic update through the real dept-server, with and
without overlap (``dept-bench pipeline --json``).

``sequential``: the worker encodes the whole update (int4, error feedback), then pushes it; the
server checks every tensor at the commit. ``pipelined``: the worker encodes on a background thread
while the push sends (``dept_comm.pipeline.PipelinedUpload``); the server checks each tensor as its
last chunk arrives, so the commit only verifies the digest and reads the norms. Each mode has its own
server process (``python -m dept_bench.pipeline --serve``) on loopback, one worker, a full pull
before each round. Reported per round: ``total_s`` (encode + push + commit, wall), ``encode_s``
(sequential: the encode before the push), ``push_s`` and ``commit_s`` (the CommitUpdate call).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from dept_comm.codecs import get_codec
from dept_comm.codecs.feedback import ErrorFeedback
from dept_comm.frames import StreamItem, as_message
from dept_comm.names import group_of
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.pipeline import PipelinedUpload
from dept_comm.streaming import PULL_LIMITS, StreamOpenInfo, encode_stream, receive_stream

from .load_server import synthetic_body

MODES = ("sequential", "pipelined")


def serve(body_mib: int, rounds: int, check_on_arrival: bool) -> None:
    """The server process: the real dept-server on a synthetic body; prints its port."""
    from dept_comm.server.run import tune_malloc
    from dept_server.config import ServerConfig  # type: ignore[import-not-found]
    from dept_server.initial import describe_run  # type: ignore[import-not-found]
    from dept_server.serve import start_dept_server  # type: ignore[import-not-found]

    tune_malloc()
    config = ServerConfig(
        port=0, rounds=rounds, workers=1, variant="spec", model=f"synthetic-{body_mib}mib",
        codec_up="int4", codec_down="int4", round_timeout_s=3600.0, heartbeat_timeout_s=3600.0,
    )  # fmt: skip
    body = synthetic_body(body_mib)
    numel = sum(t.numel() for t in body.values())
    info = describe_run(
        config, body_params=numel, vocab_size=0, vocab_digest="", full_model_fp32_bytes=4 * numel
    )
    running = start_dept_server(config, (body, "", info))
    running.app.check_on_arrival = check_on_arrival
    del body
    print(json.dumps({"port": running.port}), flush=True)
    running.app.finished.wait()
    running.app.wait_all_left(60.0, stop=threading.Event())
    running.stop(5.0)


def one_mode(mode: str, body_mib: int, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dept_bench.pipeline", "--serve", "--body-mib", str(body_mib)]
    cmd += ["--rounds", str(rounds), "--mode", mode]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        client = ServerClient(f"127.0.0.1:{port}", timeout_s=600)
        reply = client.join(service_pb2.JoinRequest(source_id="b", worker_name="b"))
        worker_id, codec = reply.worker_id, get_codec(reply.codec_up)
        feedback = ErrorFeedback(codec)
        runs = []
        for r in range(rounds):
            pulled = client.pull(service_pb2.PullRequest(worker_id=worker_id, round_idx=r, full=True))
            info, body = receive_stream(pulled, limits=PULL_LIMITS)
            del pulled
            delta = synthetic_body(body_mib, seed=100 + r)
            delta = {k: v.mul_(0.05) for k, v in delta.items() if k in body}
            open_info = StreamOpenInfo(
                upload_id=f"{worker_id}-{r}-{uuid.uuid4().hex[:8]}", sender_id=worker_id, round_idx=r,
                base_version=info.target_version, base_digest=info.target_digest, is_delta=True,
            )  # fmt: skip
            items = encode_stream(
                delta,
                open_info=open_info,
                codec=codec,
                groups={k: group_of(k) for k in delta},
                encoder=lambda name, t, c: feedback.encode(name, t),
            )
            t0 = time.monotonic()
            messages: PipelinedUpload | list[StreamItem]
            commit: pb.Commit
            if mode == "pipelined":
                messages = PipelinedUpload(items)
                t1 = t0
            else:
                encoded = list(items)
                messages, commit = encoded[:-1], as_message(encoded[-1]).commit
                t1 = time.monotonic()
            client.push(messages)
            if isinstance(messages, PipelinedUpload):
                commit = messages.commit
            t2 = time.monotonic()
            request = service_pb2.CommitUpdateRequest(
                commit=commit, worker_id=worker_id, round_idx=r, num_tokens=1
            )
            client.commit(request)
            t3 = time.monotonic()
            up_bytes = sum(m.ByteSize() for m in messages)
            runs.append(
                {
                    "total_s": t3 - t0,
                    "encode_s": t1 - t0,
                    "push_s": t2 - t1,
                    "commit_s": t3 - t2,
                    "up_bytes": up_bytes,
                }
            )
            logging.info("pipeline mode=%s round=%d %s", mode, r, runs[-1])
        client.leave(service_pb2.LeaveRequest(worker_id=worker_id, reason="done"))
        client.close()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    keys = ("total_s", "encode_s", "push_s", "commit_s")
    return {
        "mode": mode,
        "rounds": [{k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()} for run in runs],
        "median": {k: round(statistics.median(run[k] for run in runs), 4) for k in keys},
    }


def run(quick: bool = False) -> dict[str, Any]:
    body_mib, rounds = (16, 2) if quick else (128, 3)
    results = {mode: one_mode(mode, body_mib, rounds) for mode in MODES}
    seq, pipe = results["sequential"]["median"], results["pipelined"]["median"]
    return {
        "benchmark": "pipeline",
        "body_mib": body_mib,
        "codec": "int4",
        "rounds_per_mode": rounds,
        "modes": results,
        "speedup_total": round(seq["total_s"] / pipe["total_s"], 3) if pipe["total_s"] else None,
        "commit_s_ratio": round(seq["commit_s"] / pipe["commit_s"], 2) if pipe["commit_s"] else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--body-mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=MODES, default="pipelined")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.serve:
        serve(args.body_mib, args.rounds, check_on_arrival=args.mode == "pipelined")


if __name__ == "__main__":
    main()
