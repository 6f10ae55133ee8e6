"""Byte accounting: per-group meters, round records in JSONL, and the Prometheus rendering.

Meter and rendering edge cases use synthetic streams and records; the schema of the records is
checked on the metrics file a real run wrote (the session's ``real_run``, marked slow).
"""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dept_comm.accounting import (
    ByteCounts,
    ByteMeter,
    RoundMetrics,
    WorkerRoundMetrics,
    metered,
    prometheus_text,
    read_jsonl,
)
from dept_comm.codecs import get_codec
from dept_comm.digest import Group
from dept_comm.frames import as_message
from dept_comm.pb import service_pb2
from dept_comm.streaming import StreamConfig, StreamOpenInfo, encode_stream
from tests.fixtures.real_run import TEST_TIMEOUT_S, RealRun


def _stream(tensors, groups, chunk_bytes=1 << 10, codec="fp32"):
    info = StreamOpenInfo(upload_id="u1", sender_id="w")
    return encode_stream(
        tensors,
        open_info=info,
        codec=get_codec(codec),
        groups=groups,
        config=StreamConfig(chunk_bytes=chunk_bytes),
    )


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5),
    chunk_bytes=st.integers(1 << 10, 8 << 10),
    codec=st.sampled_from(["fp32", "int8"]),
)
def test_metered_sums_equal_byte_size(sizes, chunk_bytes, codec):
    tensors = {f"t{i}": torch.randn(n) for i, n in enumerate(sizes)}
    groups = {name: (Group.EMBEDDINGS if i % 2 else Group.BODY) for i, name in enumerate(tensors)}
    meter = ByteMeter()
    frames = list(metered(_stream(tensors, groups, chunk_bytes, codec), meter))
    msgs = [as_message(f) for f in frames]  # protobuf's own sizes, to check the frames' against

    total = meter.total()
    assert total.payload_bytes == sum(m.ByteSize() for m in msgs)
    assert total.messages == len(msgs)
    assert total.raw_bytes == 4 * sum(sizes)
    by_group = meter.by_group()
    assert by_group["control"].messages == 2 and by_group["control"].raw_bytes == 0
    for group in (Group.BODY, Group.EMBEDDINGS):
        names = [n for n, g in groups.items() if g is group]
        chunks = [m.chunk for m in msgs[1:-1] if f"t{m.chunk.tensor_idx}" in names]
        counts = by_group.get(group.label, ByteCounts())
        assert counts.raw_bytes == 4 * sum(tensors[n].numel() for n in names)
        assert counts.messages == len(chunks)
        assert counts.payload_bytes == sum(
            m.ByteSize() for m in msgs[1:-1] if f"t{m.chunk.tensor_idx}" in names
        )


def test_meter_counts_other_messages_as_control_and_is_thread_safe():
    meter = ByteMeter()
    req = service_pb2.PullRequest(worker_id="w1", round_idx=4)
    msgs = [req] * 200

    def work():
        for _ in metered(msgs, meter):
            pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.by_group() == {"control": ByteCounts(0, 800 * req.ByteSize(), 800)}


def test_chunks_of_a_resumed_stream_keep_their_group():
    tensors = {"e": torch.randn(1000)}
    msgs = list(_stream(tensors, Group.EMBEDDINGS))
    meter = ByteMeter()
    for m in msgs[:2]:
        meter.observe(m)
    for m in msgs[2:]:
        meter.observe(m)
    assert set(meter.by_group()) == {"control", "embeddings"}
    unknown = ByteMeter()
    unknown.observe(msgs[2])  # header never seen by this meter
    assert set(unknown.by_group()) == {"other"}


def test_byte_counts_add():
    assert ByteCounts(1, 2, 3) + ByteCounts(10, 20, 30) == ByteCounts(11, 22, 33)


def _record(round_idx, loss=0.5):
    up = ByteMeter()
    down = ByteMeter()
    list(metered(_stream({"w": torch.randn(512)}, Group.BODY), up))
    list(
        metered(
            _stream({"w": torch.randn(512), "e": torch.randn(256)}, {"w": Group.BODY, "e": Group.EMBEDDINGS}),
            down,
        )
    )
    w = WorkerRoundMetrics.from_meters('w"1\\', "sw\nx", up=up, down=down, train_loss=loss)
    w2 = WorkerRoundMetrics(worker_id="w2", source="en", up_payload_bytes=100, up_raw_bytes=400)
    return RoundMetrics(
        round=round_idx,
        variant="spec",
        num_workers=2,
        duration_s=1.25,
        up_raw_bytes=w.up_raw_bytes + 400,
        up_payload_bytes=w.up_payload_bytes + 100,
        down_raw_bytes=w.down_raw_bytes,
        down_payload_bytes=w.down_payload_bytes,
        body_digest="ab" * 16,
        workers=[w, w2],
        full_model_fp32_bytes=4096,
        uncompressed_body_bytes=2048,
        eval={"en": {"ppl": 12.5}},
    )


def test_ratios():
    r = _record(0)
    assert r.up_vs_full_model == pytest.approx(r.up_payload_bytes / (2 * 4096))
    assert r.down_vs_full_model == pytest.approx(r.down_payload_bytes / (2 * 4096))
    assert r.up_vs_uncompressed == pytest.approx(r.up_payload_bytes / r.up_raw_bytes)
    w = r.workers[0]
    assert 1.0 < w.up_payload_bytes / w.up_raw_bytes < 1.2  # fp32 payload: raw bytes plus headers
    empty = RoundMetrics(
        round=0, variant="glob", num_workers=0, duration_s=0.0, up_raw_bytes=0, up_payload_bytes=0,
        down_raw_bytes=0, down_payload_bytes=0, body_digest="", workers=[], full_model_fp32_bytes=0,
        uncompressed_body_bytes=0,
    )  # fmt: skip
    assert empty.ratios() == dict.fromkeys(empty.ratios(), 0.0)


def test_jsonl_round_trip_and_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [_record(i, loss=None if i == 1 else 0.1 * i) for i in range(3)]
    for r in records:
        r.append_jsonl(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["ratios"]["up_vs_full_model"] > 0
    back = read_jsonl(path)
    assert back == records
    assert back[0].workers[0].up_by_group["body"] == records[0].workers[0].up_by_group["body"]
    with open(path, "a") as f:
        f.write('{"round": 3, "vari')
    assert read_jsonl(path) == records
    path.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=":2:"):
        read_jsonl(path)


_SAMPLE = re.compile(r'^([a-z_]+)(\{([a-z_]+="(?:[^"\\]|\\.)*"(?:,[a-z_]+="(?:[^"\\]|\\.)*")*)\})? (\S+)$')


def test_prometheus_text_is_well_formed():
    records = [_record(0), _record(1)]
    text = prometheus_text(records)
    assert prometheus_text([]) == ""
    declared = {}
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            declared[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, line
        assert m.group(1) in declared, line
        samples[(m.group(1), m.group(3) or "")] = float(m.group(4))
    assert declared["dept_round_up_payload_bytes"] == "gauge"
    assert declared["dept_up_payload_bytes_total"] == "counter"
    assert samples[("dept_round", "")] == 1
    label = 'worker="w\\"1\\\\",source="sw\\nx"'
    last_up = samples[("dept_round_up_payload_bytes", label)]
    assert last_up == records[1].workers[0].up_payload_bytes
    total = samples[("dept_up_payload_bytes_total", label)]
    assert total == sum(r.workers[0].up_payload_bytes for r in records)
    assert samples[("dept_up_raw_bytes_total", 'worker="w2",source="en"')] == 800
    assert samples[("dept_rounds_total", "")] == 2


# -- the records a real server wrote ---------------------------------------------------------

real = pytest.mark.timeout(TEST_TIMEOUT_S)  # the session's real run may be set up by this test


@real
def test_real_round_lines_are_round_metrics_exactly(real_run: RealRun) -> None:
    """Each round line is RoundMetrics.to_json_line of what from_dict reads back from it: no field
    the server writes is lost or invented on the way."""
    lines = [
        line
        for line in real_run.metrics_path.read_text().splitlines()
        if json.loads(line).get("kind") != "final"
    ]
    assert len(lines) == real_run.rounds
    for line in lines:
        assert RoundMetrics.from_dict(json.loads(line)).to_json_line() == line


@real
def test_real_records_add_up(real_run: RealRun) -> None:
    for r in real_run.round_lines:
        record = RoundMetrics.from_dict(r)
        assert r["ratios"] == record.ratios() and set(r["ratios"]) == {
            "up_vs_full_model", "down_vs_full_model", "up_vs_uncompressed", "down_vs_uncompressed",
        }  # fmt: skip
        assert r["ratios"]["up_vs_full_model"] == pytest.approx(
            r["up_payload_bytes"] / (r["num_workers"] * r["full_model_fp32_bytes"])
        )
        assert r["ratios"]["down_vs_uncompressed"] == pytest.approx(
            r["down_payload_bytes"] / r["down_raw_bytes"]
        )
        assert r["num_workers"] == len(r["workers"]) == len(real_run.sources)
        assert {w["source"] for w in r["workers"]} == set(real_run.sources)
        for key in ("up_payload_bytes", "up_raw_bytes", "down_payload_bytes", "down_raw_bytes"):
            assert r[key] == sum(w[key] for w in r["workers"]), key
        for w in r["workers"]:
            for d in ("up", "down"):
                groups = w[f"{d}_by_group"]
                assert set(groups) == {"body", "embeddings", "control"}  # glob: the matrix crosses too
                assert w[f"{d}_payload_bytes"] == sum(g["payload_bytes"] for g in groups.values())
                assert w[f"{d}_raw_bytes"] == sum(g["raw_bytes"] for g in groups.values())
                assert w[f"{d}_messages"] == sum(g["messages"] for g in groups.values())
                assert groups["control"]["raw_bytes"] == 0
            # Every round's upload is int8 (about a byte per value); a fp32 fallback would be 4x.
            assert w["up_payload_bytes"] < 0.3 * w["up_raw_bytes"]
    final = real_run.final_line
    assert final["round"] == real_run.rounds and set(final["eval"]) == set(real_run.sources)
    assert final["up_payload_bytes"] == 0 and final["down_payload_bytes"] > 0


@real
def test_prometheus_text_of_real_records(real_run: RealRun) -> None:
    records = [RoundMetrics.from_dict(r) for r in real_run.round_lines]
    text = prometheus_text(records)
    last = records[-1]
    for w in last.workers:
        label = f'worker="{w.worker_id}",source="{w.source}"'
        assert f"dept_round_up_payload_bytes{{{label}}} {w.up_payload_bytes}" in text
        total = sum(x.down_raw_bytes for r in records for x in r.workers if x.worker_id == w.worker_id)
        assert f"dept_down_raw_bytes_total{{{label}}} {total}" in text
    assert f"dept_round {last.round}" in text and f"dept_rounds_total {len(records)}" in text
    assert f'dept_round_ratio{{ratio="up_vs_full_model"}} {last.up_vs_full_model!r}' in text


@real
def test_read_jsonl_reads_a_real_metrics_file_quietly(
    real_run: RealRun, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="dept_comm.accounting"):
        records = read_jsonl(real_run.metrics_path)
    assert records == [RoundMetrics.from_dict(r) for r in real_run.round_lines]
    assert "metrics_torn_line" not in caplog.text
