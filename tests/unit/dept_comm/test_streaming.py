"""Chunked tensor streams: round trips for every registered codec, and every bad input rejected."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dept_comm.codecs import codec_names, get_codec
from dept_comm.digest import (
    Group,
    count_nonfinite,
    dtype_from_pb,
    dtype_to_pb,
    manifest_of,
    schema_hash,
    tensors_digest,
)
from dept_comm.errors import (
    ChecksumError,
    CommitMismatchError,
    ConflictError,
    ManifestMismatchError,
    NonFiniteError,
    SizeLimitError,
    StreamOrderError,
    UnknownCodecError,
)
from dept_comm.frames import ChunkFrame, as_message, chunk_checksum
from dept_comm.manifest import tensor_payload
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.streaming import (
    ReceiveLimits,
    StreamConfig,
    StreamOpenInfo,
    StreamReceiver,
    encode_stream,
    receive_stream,
    unsent,
)

RAW_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]
KIB = 1 << 10


def _make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(-(10**6), 10**6, shape, generator=g, dtype=dtype)


@st.composite
def tensor_dicts(draw, float_only: bool):
    names = draw(st.lists(st.text("abcxyz._0", min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    out = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 40), max_size=3)))
        dtype = torch.float32 if float_only else draw(st.sampled_from(RAW_DTYPES))
        out[name] = _make(shape, dtype, draw(st.integers(0, 2**31 - 1)))
    return out


def _frames(tensors, chunk_bytes=KIB, codec="fp32", upload_id="up-1", groups=Group.BODY):
    """The stream as encode_stream yields it: chunks as frames, open and commit as messages."""
    info = StreamOpenInfo(upload_id=upload_id, sender_id="w0", round_idx=3)
    c = get_codec(codec) if isinstance(codec, str) else codec
    return list(
        encode_stream(
            tensors, open_info=info, codec=c, groups=groups, config=StreamConfig(chunk_bytes=chunk_bytes)
        )
    )


def _stream(tensors, **kw):
    """The stream as protobuf messages (what a peer using the generated code sends; easy to tamper)."""
    return [as_message(m) for m in _frames(tensors, **kw)]


def _copy(msg):
    out = pb.StreamMessage()
    out.CopyFrom(msg)
    return out


def _rechecksum(msg):
    msg.chunk.checksum = chunk_checksum(msg.chunk.data)
    return msg


def _state(rx):
    return rx.staged_bytes, rx.receipt(), rx.committed


def _rejects(rx, msg, exc, match=None):
    """``msg`` raises ``exc`` and leaves the receiver exactly as it was."""
    before = _state(rx)
    with pytest.raises(exc, match=match):
        rx.add(msg)
    assert _state(rx) == before


@pytest.mark.parametrize("codec_name", codec_names())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), chunk_bytes=st.integers(KIB, 64 * KIB))
def test_round_trip_every_codec(codec_name, data, chunk_bytes):
    codec = get_codec(codec_name)
    tensors = data.draw(tensor_dicts(float_only=codec_name != "raw"))
    frames = _frames(tensors, chunk_bytes=chunk_bytes, codec=codec)
    assert all(isinstance(f, ChunkFrame) for f in frames[1:-1])
    msgs = [as_message(f) for f in frames]
    assert [f.wire for f in frames[1:-1]] == [m.SerializeToString() for m in msgs[1:-1]]

    assert msgs[0].WhichOneof("kind") == "open" and msgs[-1].WhichOneof("kind") == "commit"
    chunks = [m.chunk for m in msgs[1:-1]]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert all(c.HasField("header") == (c.chunk_idx == 0) for c in chunks)
    assert msgs[-1].commit.num_chunks == len(chunks) and msgs[-1].commit.num_tensors == len(tensors)

    info, out = receive_stream(msgs, manifest=None)
    assert info.upload_id == "up-1" and info.round_idx == 3 and info.num_tensors == len(tensors)
    assert list(out) == list(tensors)
    for name, x in tensors.items():
        y = out[name]
        assert y.shape == x.shape
        if codec.lossless:
            assert y.dtype == x.dtype and torch.equal(y, x), name
        elif codec.name == "topk":  # sparse: what the codec itself decodes, nothing lost on the way
            assert y.dtype == torch.float32 and torch.equal(y, codec.decode(codec.encode(x), x.shape)), name
        else:
            assert y.dtype == torch.float32
            if x.numel():
                assert float((y - x).abs().max()) <= 0.1 * float(x.abs().max()) + 1e-6, name
    _, via_frames = receive_stream(frames, manifest=None)  # the frames themselves, as a server reads them
    assert list(via_frames) == list(out)
    assert all(torch.equal(via_frames[k], out[k]) for k in out)


def test_manifest_round_trip_and_groups():
    tensors = {"emb": torch.randn(50, 8), "w": torch.randn(33), "ids": torch.arange(7)}
    groups = {"emb": Group.EMBEDDINGS, "w": Group.BODY, "ids": Group.OTHER}
    msgs = _stream(tensors, codec=get_codec("raw"), groups=groups)
    manifest = manifest_of(tensors, groups)
    _, out = receive_stream(msgs, manifest=manifest)
    assert tensors_digest(out) == tensors_digest(tensors)
    headers = {m.chunk.header.name: m.chunk.header for m in msgs[1:-1] if m.chunk.HasField("header")}
    assert Group(headers["emb"].group) is Group.EMBEDDINGS
    assert headers["ids"].raw_bytes == 7 * 4 and headers["emb"].encoded_bytes == 50 * 8 * 4


def test_empty_and_scalar_tensors_still_send_one_chunk():
    tensors = {"empty": torch.zeros(0, 5), "scalar": torch.tensor(2.5)}
    msgs = _stream(tensors)
    chunks = [m.chunk for m in msgs[1:-1]]
    assert [(c.tensor_idx, c.chunk_idx, len(c.data)) for c in chunks] == [(0, 0, 0), (1, 0, 4)]
    _, out = receive_stream(msgs)
    assert out["empty"].shape == (0, 5) and out["scalar"].item() == 2.5


def test_encoder_hook_replaces_codec_encode():
    x = {"w": torch.arange(6, dtype=torch.float32)}
    msgs = list(
        encode_stream(
            x,
            open_info=StreamOpenInfo(upload_id="u"),
            codec=get_codec("fp32"),
            encoder=lambda name, t, c: c.encode(t * 2),
        )
    )
    assert torch.equal(receive_stream(msgs)[1]["w"], x["w"] * 2)


@pytest.mark.parametrize(("codec", "dtype"), [("fp32", torch.float32)] + [("raw", d) for d in RAW_DTYPES])
def test_zero_copy_payload_equals_codec_encode(codec, dtype):
    x = _make((7, 5), dtype, 1)
    c = get_codec(codec)
    assert bytes(tensor_payload("x", x, c, None)) == c.encode(x)


def test_config_validation():
    for bad in (KIB - 1, (2 << 20) + 1):
        with pytest.raises(ValueError, match="chunk_bytes"):
            StreamConfig(chunk_bytes=bad)
    with pytest.raises(ValueError):
        ReceiveLimits(max_chunk_bytes=4 << 20)


# ---- rejections: each bad input raises its own error and stages nothing ----


@pytest.fixture
def sample():
    tensors = {"a": torch.randn(600), "b": torch.randn(10, 30)}  # 2400 B -> 3 chunks; 1200 B -> 2 chunks
    return tensors, _stream(tensors)


def _opened(msgs, **kw):
    rx = StreamReceiver(**kw)
    rx.add(msgs[0])
    return rx


def test_flipped_bit_is_a_checksum_error(sample):
    _, msgs = sample
    rx = _opened(msgs)
    bad = _copy(msgs[1])
    data = bytearray(bad.chunk.data)
    data[100] ^= 0x04
    bad.chunk.data = bytes(data)
    _rejects(rx, bad, ChecksumError)
    rx.add(msgs[1])  # the good copy is still welcome


def test_chunk_before_open_and_wrong_upload_id(sample):
    _, msgs = sample
    _rejects(StreamReceiver(), msgs[1], StreamOrderError, "before the stream's open")
    rx = _opened(msgs)
    bad = _copy(msgs[1])
    bad.chunk.upload_id = "other"
    _rejects(rx, bad, StreamOrderError, "other")
    with pytest.raises(StreamOrderError, match="expected"):
        StreamReceiver(expected_upload_id="nope").add(msgs[0])


def test_open_repeated_identical_is_accepted_different_is_a_conflict(sample):
    _, msgs = sample
    rx = _opened(msgs)
    rx.add(msgs[0])
    other = _copy(msgs[0])
    other.open.round_idx = 99
    _rejects(rx, other, ConflictError)


def test_header_missing_or_misplaced(sample):
    _, msgs = sample
    rx = _opened(msgs)
    no_header = _copy(msgs[1])
    no_header.chunk.ClearField("header")
    _rejects(rx, no_header, StreamOrderError, "header")
    rx.add(msgs[1])
    extra = _copy(msgs[2])
    extra.chunk.header.CopyFrom(msgs[1].chunk.header)
    _rejects(rx, extra, StreamOrderError, "header")
    # a later chunk of a tensor whose header never came
    rx2 = _opened(msgs)
    _rejects(rx2, msgs[5], StreamOrderError, "before that tensor's header")


def test_chunk_idx_past_num_chunks(sample):
    _, msgs = sample
    rx = _opened(msgs)
    rx.add(msgs[1])
    bad = _copy(msgs[3])
    bad.chunk.chunk_idx = 3  # "a" has 3 chunks: 0..2
    bad.chunk.seq = 10
    _rejects(rx, bad, StreamOrderError, "past num_chunks")


def test_tensor_idx_past_declared_count(sample):
    _, msgs = sample
    rx = _opened(msgs)
    bad = _copy(msgs[4])
    bad.chunk.tensor_idx = 2
    _rejects(rx, bad, StreamOrderError, "tensor_idx=2")


def test_oversized_chunk_and_size_inconsistencies(sample):
    _, msgs = sample
    rx = _opened(msgs, limits=ReceiveLimits(max_chunk_bytes=512))
    _rejects(rx, msgs[1], SizeLimitError, "limit 512")
    rx = _opened(msgs)
    rx.add(msgs[1])
    short = _rechecksum(_copy(msgs[2]))
    short.chunk.data = msgs[2].chunk.data[:-8]
    _rejects(rx, _rechecksum(short), SizeLimitError, "expected 1024")


def test_manifest_mismatches(sample):
    tensors, msgs = sample
    good = manifest_of(tensors)
    cases = {
        "not in the manifest": {k: v for k, v in good.items() if k != "a"} | {"z": good["a"]},
        "shape": manifest_of({"a": torch.zeros(601), "b": tensors["b"]}),
        "dtype": manifest_of({"a": torch.zeros(600, dtype=torch.float16), "b": tensors["b"]}),
        "group": manifest_of(tensors, Group.EMBEDDINGS),
    }
    for why, manifest in cases.items():
        rx = _opened(msgs, manifest=manifest, require_all=False)
        _rejects(rx, msgs[1], ManifestMismatchError)
        assert why  # the case label documents which field differs
    with pytest.raises(ManifestMismatchError, match="manifest has 1"):
        StreamReceiver(manifest={"a": good["a"]}).add(msgs[0])


def test_repeated_name_is_rejected(sample):
    _, msgs = sample
    rx = _opened(msgs)
    rx.add(msgs[1])
    dup = _copy(msgs[4])
    dup.chunk.header.name = "a"
    _rejects(rx, dup, ManifestMismatchError, "twice")


def _with_header(msg, **fields):
    out = _copy(msg)
    for k, v in fields.items():
        setattr(out.chunk.header, k, v)
    return out


def test_header_limits(sample):
    _, msgs = sample
    first = msgs[1]
    rx = _opened(msgs)
    _rejects(rx, _with_header(first, encoded_bytes=2401, num_chunks=3), SizeLimitError, "cap 2400")
    _rejects(rx, _with_header(first, raw_bytes=4), SizeLimitError, "raw_bytes")
    _rejects(rx, _with_header(first, num_chunks=40), StreamOrderError, "num_chunks")
    _rejects(rx, _with_header(first, codec="nope"), UnknownCodecError)
    _rejects(rx, _with_header(first, digest=b"short"), StreamOrderError, "digest")
    _rejects(rx, _with_header(first, dtype=0), ManifestMismatchError, "dtype")
    _rejects(rx, _with_header(first, group=0), ManifestMismatchError, "group")
    _rejects(rx, _with_header(first, name=""), ManifestMismatchError, "name")
    small = _opened(msgs, limits=ReceiveLimits(max_total_raw_bytes=1000))
    _rejects(small, first, SizeLimitError, "max_total_raw_bytes")
    allowed = _opened(msgs, limits=ReceiveLimits(allowed_codecs=frozenset({"int8"})))
    _rejects(allowed, first, UnknownCodecError, "not allowed")
    with pytest.raises(SizeLimitError, match="limit 1"):
        StreamReceiver(limits=ReceiveLimits(max_tensors=1)).add(msgs[0])


def test_non_finite_values_are_rejected_by_name():
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(300)
        x[17] = bad
        msgs = _stream({"ok": torch.ones(3), "poisoned": x})
        with pytest.raises(NonFiniteError, match="'poisoned' has 1 non-finite"):
            receive_stream(msgs)
        _, out = receive_stream(msgs, limits=ReceiveLimits(require_finite=False))
        assert count_nonfinite(out["poisoned"]) == 1


def test_commit_mismatches(sample):
    _, msgs = sample
    commit = msgs[-1].commit

    def full():
        rx = StreamReceiver()
        for m in msgs[:-1]:
            rx.add(m)
        return rx

    for field, value in (("num_chunks", commit.num_chunks + 1), ("num_tensors", 1), ("digest", b"\0" * 16)):
        bad = pb.Commit()
        bad.CopyFrom(commit)
        setattr(bad, field, value)
        rx = full()
        with pytest.raises(CommitMismatchError):
            rx.commit(bad)
        assert not rx.committed
        with pytest.raises(StreamOrderError):
            next(rx.tensors())
    rx = StreamReceiver()
    for i, m in enumerate(msgs[:-1]):
        if i != 3:
            rx.add(m)
    with pytest.raises(CommitMismatchError, match=r"missing seqs \[2\]"):
        rx.commit(commit)
    other = pb.Commit()
    other.CopyFrom(commit)
    other.upload_id = "else"
    with pytest.raises(CommitMismatchError):
        full().commit(other)


def test_tensors_before_commit_and_twice(sample):
    tensors, msgs = sample
    rx = StreamReceiver()
    for m in msgs[:-1]:
        rx.add(m)
    with pytest.raises(StreamOrderError, match="before a verified commit"):
        rx.decode_all()
    rx.add(msgs[-1])
    rx.commit(msgs[-1].commit)  # identical commit: idempotent
    different = pb.Commit()
    different.CopyFrom(msgs[-1].commit)
    different.num_tensors = 7
    with pytest.raises(ConflictError):
        rx.commit(different)
    out = rx.decode_all()
    assert torch.equal(out["b"], tensors["b"])
    assert rx.staged_bytes == 0
    with pytest.raises(StreamOrderError, match="twice"):
        rx.decode_all()


def test_duplicate_seq_same_bytes_once_different_bytes_conflict(sample):
    tensors, msgs = sample
    rx = _opened(msgs)
    rx.add(msgs[1])
    rx.add(msgs[2])
    held = _state(rx)
    rx.add(msgs[2])  # resent: accepted, counted once
    assert _state(rx) == held and rx.receipt() == (2, [])
    changed = _copy(msgs[2])
    data = bytearray(changed.chunk.data)
    data[0] ^= 1
    changed.chunk.data = bytes(data)
    _rejects(rx, _rechecksum(changed), ConflictError)
    moved = _copy(msgs[2])
    moved.chunk.seq = 9
    _rejects(rx, moved, ConflictError, "another seq")
    for m in msgs[3:]:
        rx.add(m)
    assert torch.equal(rx.decode_all()["a"], tensors["a"])


def test_out_of_order_resend_and_receipt(sample):
    tensors, msgs = sample
    body = msgs[1:-1]  # seqs 0..4
    rx = _opened(msgs)
    for i in (0, 3, 4):  # seqs 1 and 2 lost
        rx.add(body[i])
    assert rx.receipt() == (3, [1, 2])
    assert list(rx.push_receipt().missing_seqs) == [1, 2]
    with pytest.raises(CommitMismatchError):
        rx.commit(msgs[-1].commit)
    rx.add(body[2])
    rx.add(body[1])
    assert rx.receipt() == (5, [])
    rx.add(msgs[-1])
    assert rx.push_receipt().digest == msgs[-1].commit.digest
    assert tensors_digest(rx.decode_all()) == tensors_digest(tensors)


def test_seq_far_ahead_and_chunks_after_commit(sample):
    _, msgs = sample
    rx = _opened(msgs)
    far = _copy(msgs[1])
    far.chunk.seq = 1 << 20
    _rejects(rx, far, StreamOrderError, "past seq")
    for m in msgs[1:]:
        rx.add(m)
    extra = _copy(msgs[1])
    extra.chunk.seq = 5
    _rejects(rx, extra, StreamOrderError, "after the commit")


def test_receive_stream_requires_a_commit(sample):
    _, msgs = sample
    with pytest.raises(CommitMismatchError, match="without a commit"):
        receive_stream(msgs[:-1])
    with pytest.raises(StreamOrderError, match="after the commit"):
        receive_stream(msgs + [msgs[1]])


def test_discard_frees_and_refuses(sample):
    _, msgs = sample
    rx = _opened(msgs)
    rx.add(msgs[1])
    rx.discard()
    assert rx.staged_bytes == 0
    with pytest.raises(StreamOrderError, match="discarded"):
        rx.add(msgs[2])


# ---- manifests and digests ----


def test_digests_and_schema_hash():
    a = {"x": torch.randn(4, 5), "y": torch.arange(3)}
    b = {"y": a["y"].clone(), "x": a["x"].clone()}
    assert tensors_digest(a) == tensors_digest(b) and len(tensors_digest(a)) == 16
    flipped = {"x": a["x"].clone(), "y": a["y"]}
    flipped["x"].view(torch.int32)[2, 3] ^= 1
    assert tensors_digest(flipped) != tensors_digest(a)
    assert tensors_digest({"x": a["x"].reshape(5, 4), "y": a["y"]}) != tensors_digest(a)
    assert tensors_digest({"x": a["x"].t().contiguous().t(), "y": a["y"]}) == tensors_digest(a)
    assert schema_hash(manifest_of(a)) == schema_hash(manifest_of(b))
    assert schema_hash(manifest_of(a)) != schema_hash(manifest_of({"x": a["x"].double(), "y": a["y"]}))
    assert schema_hash(manifest_of(a)) != schema_hash(manifest_of({"x": a["x"], "yy": a["y"]}))


def test_dtype_mapping_round_trips_and_refuses_unknown():
    for d in RAW_DTYPES:
        assert dtype_from_pb(dtype_to_pb(d)) == d
    with pytest.raises(ManifestMismatchError):
        dtype_to_pb(torch.float64)
    with pytest.raises(ManifestMismatchError):
        dtype_from_pb(0)


def test_count_nonfinite_all_float_dtypes():
    x = torch.randn(3000)
    x[[1, 50, 2999]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert count_nonfinite(x.to(d)) == 3
        assert count_nonfinite(torch.randn(100).to(d)) == 0
    assert count_nonfinite(torch.arange(5)) == 0


def test_payload_digest_mismatch_is_caught_at_commit(sample):
    _, msgs = sample
    forged = [_copy(m) for m in msgs]
    forged[4].chunk.header.digest = b"\x01" * 16  # chunk checksums still match: only the header lies
    rx = StreamReceiver()
    with pytest.raises(CommitMismatchError, match="'b'.*does not hash to its header's digest"):
        for m in forged:
            rx.add(m)
    assert not rx.committed


def test_unsent_resends_the_open_and_exactly_the_chunks_not_held():
    tensors = {"a": torch.randn(700), "b": torch.randn(300)}
    frames = _frames(tensors)  # 1 KiB chunks: "a" 3 chunks, "b" 2 chunks; open ... commit
    upload = frames[:-1]
    rx = StreamReceiver()
    held = {0, 2, 3}  # chunk seqs 1 and 4 were lost on the way
    for m in upload:
        if not isinstance(m, ChunkFrame) or m.seq in held:
            rx.add(m)
    receipt = rx.push_receipt()
    assert receipt.num_chunks == 3 and list(receipt.missing_seqs) == [1]
    todo = unsent(upload, receipt)
    assert todo[0] is upload[0]  # the open goes again
    assert [m.seq for m in todo[1:]] == [1, 4]
    for m in todo:
        rx.add(m)  # a repeated open is accepted once
    rx.add(frames[-1])
    assert rx.committed
    out = rx.decode_all()
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)

    nothing_held = unsent([as_message(m) for m in upload], StreamReceiver().push_receipt())
    assert len(nothing_held) == len(upload)  # protobuf chunks are recognised too
