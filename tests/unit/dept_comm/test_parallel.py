"""dept_comm.parallel: stripe values, push stripes and the merge of pull stripes."""

from __future__ import annotations

import pytest
import torch

from dept_comm.codecs import get_codec
from dept_comm.errors import InvalidInputError
from dept_comm.frames import chunk_of, kind_of
from dept_comm.parallel import MAX_STREAMS, StripeMismatchError, merge_stripes, split_push, stripe_of
from dept_comm.pb import service_pb2
from dept_comm.streaming import StreamConfig, StreamOpenInfo, StreamReceiver, encode_stream


def _stream(upload_id: str = "u", target_version: int = 0) -> list:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(1000 + 300 * i, generator=gen) for i in range(5)}
    info = StreamOpenInfo(upload_id=upload_id, target_version=target_version)
    config = StreamConfig(chunk_bytes=1024)
    return list(encode_stream(tensors, open_info=info, codec=get_codec("fp32"), config=config))


def test_stripe_values():
    assert stripe_of(service_pb2.PullRequest()) == (0, 1)
    assert stripe_of(service_pb2.PullRequest(stream_index=2, stream_count=3)) == (2, 3)
    for index, count in ((0, 0), (3, 3), (0, MAX_STREAMS + 1), (1, None)):
        request = service_pb2.PullRequest(stream_index=index)
        if count is not None:
            request.stream_count = count
        with pytest.raises(InvalidInputError):
            stripe_of(request)


@pytest.mark.parametrize("count", [1, 2, 3, 8, 100])
def test_push_stripes_cover_every_chunk_and_each_is_receivable_in_any_order(count):
    messages = _stream()
    upload, commit = messages[:-1], messages[-1]
    stripes = split_push(upload, count)
    assert len(stripes) == count
    seqs = sorted({chunk_of(m).seq for s in stripes for m in s[1:]})
    assert seqs == list(range(len(upload) - 1))
    assert sum(len(s) - 1 for s in stripes) <= len(upload) - 1 + count - 1
    rx = StreamReceiver()
    for stripe in reversed(stripes):  # the last stripe first: every run brings its tensor's header
        for m in stripe:
            rx.add(m)
    rx.add(commit)
    assert rx.committed


def test_push_stripes_refuse_a_commit():
    with pytest.raises(ValueError, match="only chunks"):
        split_push(_stream(), 2)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_merged_pull_stripes_are_the_stream(count):
    messages = _stream()
    chunks = messages[1:-1]
    stripes = [
        [messages[0], *[m for m in chunks if chunk_of(m).seq % count == i], messages[-1]]
        for i in range(count)
    ]
    merged = merge_stripes(stripes)
    assert [kind_of(m) for m in merged] == [kind_of(m) for m in messages]
    assert [chunk_of(m).seq for m in merged[1:-1]] == [chunk_of(m).seq for m in chunks]


def test_stripes_of_different_streams_do_not_merge():
    a, b = _stream("down-v1-full", 1), _stream("down-v2-full", 2)
    with pytest.raises(StripeMismatchError):
        merge_stripes([a, b])
