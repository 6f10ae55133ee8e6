"""Each codec end to end: the body's payload bytes stay within what the codec itself can emit.

A real server and worker run two rounds with ``--codec-up C --codec-down C``. For every round the
server's metrics give, per worker, the body group's raw bytes (4 per value) and payload bytes (the
protobuf messages that carried them). The bound is computed from the codec's own definition
(``max_encoded_bytes``: int8 one byte per value plus a bfloat16 scale per block, int4 half a byte
plus the scales, bf16 two bytes, fp32 four, topk per block two scales and ``keep`` indices and values) for the body tensors the server checkpointed, plus the
protobuf framing of one chunk message per tensor, measured on a chunk with every field at its
widest. A codec that silently fell back to fp32 sends ~1.0x raw and fails every lossy bound; the
down-link is checked on the delta pulls (after round 0), which the server encodes with its codec.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dept_comm.checkpoint import CheckpointStore
from dept_comm.codecs import Codec, get_codec
from dept_comm.digest import Group
from dept_comm.names import BODY_PREFIX
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.streaming import StreamConfig
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
    worker_digests,
)
from tests.e2e.test_rounds import server_args, worker_args

pytestmark = pytest.mark.slow

TOPK = "topk:k=0.02,bits=2"
CODECS = ["fp32", "bf16", "bf16-zstd", "int8", "int4", TOPK]
UPLOAD_ID_MAX = 64  # longer than any upload id the worker ("w-<12 hex>-<round>-<12 hex>") or server makes
U32, U64 = 2**32 - 1, 2**64 - 1


def chunk_message_bytes(name: str, shape: tuple[int, ...], codec: Codec, data_bytes: int) -> int:
    """Size of a StreamMessage chunk carrying ``data_bytes`` of ``name`` with a header, every
    integer at its widest (an upper bound of the real message's ByteSize)."""
    header = pb.TensorHeader(
        name=name,
        shape=list(shape),
        dtype=pb.DTYPE_FLOAT32,
        codec=codec.name,
        codec_params=pb.CodecParams(block_size=U32, zstd_level=-1, bits=U32, keep=U32),
        raw_bytes=U64,
        encoded_bytes=U64,
        group=pb.TENSOR_GROUP_BODY,
        num_chunks=U32,
        digest=b"\xff" * 16,
    )
    chunk = pb.TensorChunk(
        upload_id="u" * UPLOAD_ID_MAX,
        seq=U64,
        tensor_idx=U32,
        chunk_idx=U32,
        header=header,
        data=b"\0" * data_bytes,
        checksum=U64,
    )
    return pb.StreamMessage(chunk=chunk).ByteSize()


def payload_bound(codec_name: str, body: dict[str, torch.Tensor]) -> float:
    """Largest payload/raw ratio the codec can produce for these body tensors on the wire."""
    codec = get_codec(codec_name)  # the server's and worker's codec: default parameters
    step = StreamConfig().chunk_bytes
    payload = raw = 0
    for name, t in body.items():
        encoded = codec.max_encoded_bytes(t.numel())
        chunks = max(1, math.ceil(encoded / step))
        # every chunk framed as if it carried a header too: an upper bound
        payload += sum(
            chunk_message_bytes(name, tuple(t.shape), codec, min(step, encoded - i * step))
            for i in range(chunks)
        )
        raw += 4 * t.numel()
    return payload / raw


def body_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    with CheckpointStore(ckpt_dir) as store:
        saved = store.latest()
    assert saved is not None, f"no checkpoint in {ckpt_dir}"
    return {k: v for k, v in saved.tensors["shared"].items() if k.startswith(BODY_PREFIX)}


def body_ratio(counts: dict[str, dict[str, int]], where: str) -> float:
    body = counts.get(Group.BODY.label)
    assert body and body["raw_bytes"] > 0 and body["payload_bytes"] > 0, f"no body bytes {where}: {counts}"
    return body["payload_bytes"] / body["raw_bytes"]


def test_bounds_tell_the_codecs_apart() -> None:
    """The bounds this file checks are tight enough that fp32 bytes fail every lossy codec's."""
    body = {f"{BODY_PREFIX}w{i}": torch.zeros(64, 256) for i in range(4)}
    bounds = {c: payload_bound(c, body) for c in CODECS}
    assert 1.0 < bounds["fp32"] < 1.01
    for c in ("bf16", "bf16-zstd"):
        assert 0.5 < bounds[c] < 0.51, bounds
    assert 0.25 < bounds["int8"] < 0.27 and 0.125 < bounds["int4"] < 0.14, bounds
    # topk at k=0.02, 2 bits: 4 scale bytes per 4096-value block, 2 index bytes and 1/4 byte per sent value
    assert 0.01 < bounds[TOPK] < 0.015, bounds


@pytest.mark.timeout(START_S + RUN_S + EXIT_S + MARGIN_S)
@pytest.mark.parametrize("codec", CODECS)
def test_codec_end_to_end_within_its_bound(codec: str, global_vocab: Path, tmp_path: Path) -> None:
    args = server_args(
        "spec", global_vocab, tmp_path, rounds=2, extra=["--codec-up", codec, "--codec-down", codec]
    )
    args[args.index("--workers") + 1] = "1"
    server = Server(args, tmp_path / "server.log")
    source = "sw"
    worker = start_worker(worker_args(server.port, source, global_vocab, tmp_path), tmp_path / "sw.log")
    wait_workers({source: worker}, RUN_S)
    assert server.wait(EXIT_S) == 0, describe()

    rounds = [r for r in records(tmp_path / "metrics.jsonl") if r.get("kind") != "final"]
    assert [r["round"] for r in rounds] == [0, 1], describe()
    bound = payload_bound(codec, body_tensors(tmp_path / "ckpt"))
    fp32_floor = 1.0  # what a silent fallback to fp32 would send, at least
    for r in rounds:
        assert r["codec_up"] == codec and r["codec_down"] == codec, r
        (w,) = r["workers"]
        up = body_ratio(w["up_by_group"], f"up in round {r['round']}")
        assert up <= bound, f"{codec}: body upload at {up:.4f} of raw bytes, the codec allows {bound:.4f}"
        if codec != "fp32":
            assert bound < fp32_floor
        if r["round"] >= 1:  # round 0 pulls the full body (fp32); later pulls are the encoded update
            down = body_ratio(w["down_by_group"], f"down in round {r['round']}")
            assert down <= bound, f"{codec}: body delta pull at {down:.4f} of raw bytes, allowed {bound:.4f}"
    # The decoded updates agree bit for bit on both ends: the worker's replica after each round
    # has the digest the server recorded.
    digests = worker_digests(tmp_path / f"w-{source}")
    for r in rounds:
        assert digests[r["round"] + 1] == r["body_digest"], f"{codec}: replica diverged at round {r['round']}"
