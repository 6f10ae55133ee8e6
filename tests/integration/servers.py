"""A real dept-server in this process, and a worker's first steps against it, for integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dept_comm.codecs import get_codec
from dept_comm.frames import StreamItem
from dept_comm.pb import service_pb2
from dept_comm.streaming import PULL_LIMITS, StreamConfig, StreamOpenInfo, encode_stream, receive_stream
from dept_server.config import ServerConfig
from dept_server.run import RunningServer, start_server
from dept_worker.client import ServerClient


@contextmanager
def serving(tmp_path: Path, **overrides: object) -> Iterator[RunningServer]:
    """A spec/tiny server on 127.0.0.1:0 with a checkpoint dir; ``overrides`` replace any setting."""
    settings: dict[str, object] = {
        "port": 0, "rounds": 2, "workers": 1, "variant": "spec", "model": "tiny",
        "codec_up": "int8", "codec_down": "int8", "checkpoint_dir": tmp_path / "ckpt",
    }  # fmt: skip
    server = start_server(ServerConfig(**(settings | overrides)))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop(None)


def join_and_pull(
    client: ServerClient, source: str = "sw"
) -> tuple[str, StreamOpenInfo, dict[str, torch.Tensor]]:
    """Join as ``source`` and pull the whole body: (worker id, the pull's open info, the body)."""
    worker_id = client.join(service_pb2.JoinRequest(source_id=source, worker_name=source)).worker_id
    pulled = client.pull(service_pb2.PullRequest(worker_id=worker_id, full=True))
    info, body = receive_stream(pulled, limits=PULL_LIMITS)
    return worker_id, info, body


def delta_upload(
    worker_id: str,
    info: StreamOpenInfo,
    body: dict[str, torch.Tensor],
    *,
    chunk_bytes: int,
    value: float = 0.01,
) -> list[StreamItem]:
    """An fp32 update of ``value`` everywhere for round 0, from the pulled state, in small chunks."""
    open_info = StreamOpenInfo(
        upload_id=f"u-{uuid.uuid4().hex}",
        sender_id=worker_id,
        round_idx=0,
        base_version=info.target_version,
        base_digest=info.target_digest,
        is_delta=True,
    )
    delta = {k: torch.full_like(v, value) for k, v in body.items()}
    config = StreamConfig(chunk_bytes=chunk_bytes)
    return list(encode_stream(delta, open_info=open_info, codec=get_codec("fp32"), config=config))
