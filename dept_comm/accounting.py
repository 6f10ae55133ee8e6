"""Byte accounting: per-group raw and payload bytes of streams, per-round records, JSONL and Prometheus."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from dept_comm.digest import Group
from dept_comm.frames import ChunkFrame, Undecodable, chunk_of, header_of, kind_of
from dept_comm.pb import tensor_pb2 as pb

__all__ = [
    "CONTROL",
    "ByteCounts",
    "ByteMeter",
    "RoundMetrics",
    "WorkerRoundMetrics",
    "metered",
    "prometheus_text",
    "read_jsonl",
]

logger = logging.getLogger(__name__)

CONTROL = "control"  # open/commit messages and every non-tensor message
_UNKNOWN_GROUP = Group.OTHER.label  # a chunk whose tensor header this meter has not seen

M = TypeVar("M", bound=Message | ChunkFrame | Undecodable)


@dataclass(slots=True)
class ByteCounts:
    """Raw tensor bytes (numel * 4, the fp32 reference), protobuf payload bytes and messages."""

    raw_bytes: int = 0
    payload_bytes: int = 0
    messages: int = 0

    def __add__(self, other: ByteCounts) -> ByteCounts:
        return ByteCounts(
            self.raw_bytes + other.raw_bytes,
            self.payload_bytes + other.payload_bytes,
            self.messages + other.messages,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteCounts:
        return cls(int(d.get("raw_bytes", 0)), int(d.get("payload_bytes", 0)), int(d.get("messages", 0)))


def _group_label(value: int) -> str:
    try:
        return Group(value).label
    except ValueError:
        return _UNKNOWN_GROUP


class ByteMeter:
    """Counts messages crossing the wire by group ("body", "embeddings", "other", "control").

    ``payload_bytes`` is ``msg.ByteSize()``: gRPC adds 5 bytes per message plus HTTP/2 framing.
    A chunk counts toward its tensor's group, known from the header on the tensor's first chunk;
    an open message starts a new stream. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[str, ByteCounts] = {}
        self._tensor_group: dict[int, str] = {}  # tensor_idx -> group label, for the current stream

    def observe(self, msg: Message | ChunkFrame | Undecodable) -> None:
        """Count one message (a protobuf message, a chunk frame, or bytes that parsed as neither)."""
        size = msg.ByteSize()
        chunk: pb.TensorChunk | ChunkFrame | None = None
        if isinstance(msg, pb.TensorChunk):
            chunk = msg
        elif isinstance(msg, (pb.StreamMessage, ChunkFrame, Undecodable)):
            chunk = chunk_of(msg)
        header = header_of(chunk) if chunk is not None else None
        with self._lock:
            if isinstance(msg, pb.StreamMessage) and kind_of(msg) == "open":
                self._tensor_group.clear()  # a new stream: its tensor indices start again
            raw = 0
            if chunk is None:
                label = CONTROL
            elif header is not None:
                label = _group_label(header.group)
                self._tensor_group[chunk.tensor_idx] = label
                raw = header.raw_bytes
            else:
                label = self._tensor_group.get(chunk.tensor_idx, _UNKNOWN_GROUP)
            c = self._groups.setdefault(label, ByteCounts())
            c.raw_bytes += raw
            c.payload_bytes += size
            c.messages += 1

    def by_group(self) -> dict[str, ByteCounts]:
        """A copy of the counts per group label (only groups seen)."""
        with self._lock:
            return {k: ByteCounts(v.raw_bytes, v.payload_bytes, v.messages) for k, v in self._groups.items()}

    def total(self) -> ByteCounts:
        out = ByteCounts()
        for c in self.by_group().values():
            out = out + c
        return out


def metered(messages: Iterable[M], meter: ByteMeter) -> Iterator[M]:
    """Count each message as it crosses the wire; wrap send and receive iterators alike."""
    for msg in messages:
        meter.observe(msg)
        yield msg


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


@dataclass(slots=True)
class WorkerRoundMetrics:
    """One worker's traffic in one round (up: worker -> server; down: server -> worker)."""

    worker_id: str
    source: str
    up_raw_bytes: int = 0
    up_payload_bytes: int = 0
    down_raw_bytes: int = 0
    down_payload_bytes: int = 0
    train_loss: float | None = None
    up_by_group: dict[str, ByteCounts] = field(default_factory=dict)
    down_by_group: dict[str, ByteCounts] = field(default_factory=dict)
    up_messages: int = 0
    down_messages: int = 0

    @classmethod
    def from_meters(
        cls, worker_id: str, source: str, *, up: ByteMeter, down: ByteMeter, train_loss: float | None = None
    ) -> WorkerRoundMetrics:
        u, d = up.total(), down.total()
        return cls(
            worker_id=worker_id,
            source=source,
            up_raw_bytes=u.raw_bytes,
            up_payload_bytes=u.payload_bytes,
            down_raw_bytes=d.raw_bytes,
            down_payload_bytes=d.payload_bytes,
            train_loss=train_loss,
            up_by_group=up.by_group(),
            down_by_group=down.by_group(),
            up_messages=u.messages,
            down_messages=d.messages,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerRoundMetrics:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("up_by_group", "down_by_group"):
            kw[key] = {g: ByteCounts.from_dict(c) for g, c in (d.get(key) or {}).items()}
        return cls(**kw)


@dataclass(slots=True)
class RoundMetrics:
    """The server's record of one round: bytes up and down, per worker, against two baselines.

    Baselines: ``full_model_fp32_bytes`` is what standard data parallel would send per worker and
    direction; the uncompressed exchange is the round's own tensors in fp32 (``*_raw_bytes``).
    """

    round: int
    variant: str
    num_workers: int
    duration_s: float
    up_raw_bytes: int
    up_payload_bytes: int
    down_raw_bytes: int
    down_payload_bytes: int
    body_digest: str  # xxh3-128 of the body tensors alone
    workers: list[WorkerRoundMetrics]
    full_model_fp32_bytes: int
    uncompressed_body_bytes: int
    eval: dict[str, dict[str, float]] = field(default_factory=dict)
    version: int = 0
    codec_up: str = ""
    codec_down: str = ""
    # The round digest: every tensor the replicas share (body and any shared embeddings).
    digest: str = ""
    # When replicas hold different subsets of the shared state (TRIM's rows), the digest each
    # one must have, by source; empty when every replica carries ``digest``.
    replica_digests: dict[str, str] = field(default_factory=dict)
    timestamp_unix_s: float = field(default_factory=time.time)

    @property
    def up_vs_full_model(self) -> float:
        """Upload payload per worker over the full model in fp32."""
        return _ratio(self.up_payload_bytes, self.num_workers * self.full_model_fp32_bytes)

    @property
    def down_vs_full_model(self) -> float:
        """Download payload per worker over the full model in fp32."""
        return _ratio(self.down_payload_bytes, self.num_workers * self.full_model_fp32_bytes)

    @property
    def up_vs_uncompressed(self) -> float:
        """Upload payload over the same tensors in fp32."""
        return _ratio(self.up_payload_bytes, self.up_raw_bytes)

    @property
    def down_vs_uncompressed(self) -> float:
        """Download payload over the same tensors in fp32."""
        return _ratio(self.down_payload_bytes, self.down_raw_bytes)

    def ratios(self) -> dict[str, float]:
        """Payload bytes against the full model and against the uncompressed body, each way."""
        return {
            "up_vs_full_model": self.up_vs_full_model,
            "down_vs_full_model": self.down_vs_full_model,
            "up_vs_uncompressed": self.up_vs_uncompressed,
            "down_vs_uncompressed": self.down_vs_uncompressed,
        }

    def to_dict(self) -> dict[str, Any]:
        """Every field, and the ratios, as plain JSON types."""
        d = asdict(self)
        d["ratios"] = self.ratios()
        return d

    def to_json_line(self) -> str:
        """One sorted, compact JSON line (a line of metrics.jsonl)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def append_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Append this record as one line, flushed and fsynced (a crash keeps whole lines)."""
        line = self.to_json_line() + "\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        logger.info(
            "round_metrics round=%d up_payload_bytes=%d down_payload_bytes=%d up_vs_full_model=%.4f",
            self.round,
            self.up_payload_bytes,
            self.down_payload_bytes,
            self.up_vs_full_model,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundMetrics:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["workers"] = [WorkerRoundMetrics.from_dict(w) for w in d.get("workers", [])]
        return cls(**kw)


def read_jsonl(path: str | os.PathLike[str]) -> list[RoundMetrics]:
    """Every round record of a metrics file; a torn last line (crash mid-write) is skipped with a
    warning. Lines of other kinds (``"kind": "final"``, the run's closing line) are not rounds and
    are passed over.

    Raises:
        ValueError: a malformed line other than the last.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out: list[RoundMetrics] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if isinstance(row, dict) and row.get("kind") is not None:
                continue
            out.append(RoundMetrics.from_dict(row))
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
            if i == len(lines) - 1:
                logger.warning("metrics_torn_line path=%s line=%d error=%s", path, i + 1, err)
                break
            raise ValueError(f"{path}:{i + 1}: bad metrics record: {err}") from err
    return out


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lbl = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lbl}}} {_fmt(value)}" if lbl else f"{name} {_fmt(value)}")


_DIRECTIONS = ("up", "down")
_KINDS = ("payload", "raw")


def prometheus_text(records: Sequence[RoundMetrics]) -> str:
    """The latest round's figures and cumulative totals in Prometheus text exposition format."""
    out = _Exposition()
    if not records:
        return ""
    last = records[-1]
    out.metric("dept_round", "gauge", "Index of the latest finished round.", [({}, last.round)])
    out.metric(
        "dept_round_duration_seconds", "gauge", "Wall time of the latest round.", [({}, last.duration_s)]
    )
    out.metric("dept_round_num_workers", "gauge", "Workers in the latest round.", [({}, last.num_workers)])
    for d in _DIRECTIONS:
        for k in _KINDS:
            out.metric(
                f"dept_round_{d}_{k}_bytes",
                "gauge",
                f"{'Upload' if d == 'up' else 'Download'} {k} bytes of the latest round, per worker.",
                [
                    ({"worker": w.worker_id, "source": w.source}, getattr(w, f"{d}_{k}_bytes"))
                    for w in last.workers
                ],
            )
    out.metric(
        "dept_round_ratio",
        "gauge",
        "Payload of the latest round over a baseline (full model in fp32, or uncompressed tensors).",
        [({"ratio": name}, value) for name, value in last.ratios().items()],
    )
    for d in _DIRECTIONS:
        for k in _KINDS:
            totals: dict[tuple[str, str], int] = {}
            for r in records:
                for w in r.workers:
                    key = (w.worker_id, w.source)
                    totals[key] = totals.get(key, 0) + getattr(w, f"{d}_{k}_bytes")
            out.metric(
                f"dept_{d}_{k}_bytes_total",
                "counter",
                f"{'Upload' if d == 'up' else 'Download'} {k} bytes over all recorded rounds, per worker.",
                [({"worker": w, "source": s}, v) for (w, s), v in sorted(totals.items())],
            )
    out.metric("dept_rounds_total", "counter", "Rounds recorded.", [({}, len(records))])
    return "\n".join(out.lines) + "\n"
