"""One transfer over several concurrent gRPC streams ("stripes").

A single Python gRPC stream is bound by one thread's CPU (~1.3-1.5 GB/s on loopback here), well
below what a fast link or loopback TCP moves. A transfer can therefore be cut into ``count``
stripes that travel at once, each on its own stream of the same channel (HTTP/2 multiplexes
them on one connection; each has its own flow-control window):

- push: stripe ``i`` is the upload's open followed by the ``i``-th of ``count`` contiguous runs of
  chunks (led by its first tensor's header chunk when the run starts inside a tensor: a receiver
  needs a tensor's header first), sent as its own ``PushUpdate`` of the same upload id. The
  server's ``StreamReceiver`` keeps chunks by seq under a lock and an identical resend once, so
  the stripes may arrive in any interleaving; the commit goes afterwards with ``CommitUpdate``
  as for one stream. Each stripe resumes on its own (``QueryUpload`` and
  ``streaming.unsent``: the receipt's held seqs are per upload, so a stripe resends only its own
  missing chunks).
- pull: ``PullRequest.stream_index``/``stream_count`` ask for one stripe: the open, that stripe's
  chunks, the commit. :func:`merge_stripes` joins the stripes into the one stream the receiver
  verifies as a whole (chunk checksums, tensor digests, commit digest); a stripe's resume names
  the first seq it still lacks.

``count == 1`` is exactly the single-stream protocol.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from dept_comm.errors import InvalidInputError, StreamOrderError
from dept_comm.frames import StreamItem, Undecodable, WireItem, as_message, chunk_of, kind_of
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb

__all__ = [
    "DEFAULT_STREAMS",
    "MAX_STREAMS",
    "check_streams",
    "StripeMismatchError",
    "in_stripe",
    "merge_stripes",
    "pull_striped",
    "push_striped",
    "run_all",
    "split_push",
    "stripe_of",
    "stripe_request",
]

T = TypeVar("T")

# ``dept-bench wire`` on the 2-core sandbox (benchmarks/results/2026-11-28-cpu-wire, 7 runs over two
# builds): 2 streams against 1 gave push -4..+4% and pull -8..+14% (best of 11), medians either
# way, at more CPU per MiB on both sides (client and server share 2 cores there, so no stripe adds
# CPU); 4 streams slower. No clear gain, so one stream by default. More streams help where one
# stream's rate is capped by a per-stream window over a long round trip (each stripe adds
# dept-server's --stream-window-kib in flight) or where both ends have cores to spare: measure there.
DEFAULT_STREAMS = 1
MAX_STREAMS = 16  # a server refuses more stripes than this for one pull


class StripeMismatchError(StreamOrderError):
    """The stripes of one pull came from different streams (a version closed between them)."""


def check_streams(streams: int) -> int:
    """``streams`` if a transfer may use that many concurrent streams.

    Raises:
        ValueError: not in [1, ``MAX_STREAMS``].
    """
    if not 1 <= streams <= MAX_STREAMS:
        raise ValueError(f"streams must be in [1, {MAX_STREAMS}], got {streams}")
    return streams


def stripe_of(request: service_pb2.PullRequest) -> tuple[int, int]:
    """``(stream_index, stream_count)`` of a pull request; ``(0, 1)`` when no stripe is asked for.

    Raises:
        InvalidInputError: an explicit count of 0 or over ``MAX_STREAMS``, or an index not below
            the count.
    """
    count = request.stream_count if request.HasField("stream_count") else 1
    index = request.stream_index
    if not 1 <= count <= MAX_STREAMS:
        raise InvalidInputError(f"stream_count={count} must be in [1, {MAX_STREAMS}]")
    if index >= count:
        raise InvalidInputError(f"stream_index={index} must be below stream_count={count}")
    return index, count


def in_stripe(seq: int, index: int, count: int) -> bool:
    """Whether chunk ``seq`` travels in stripe ``index`` of ``count``."""
    return count == 1 or seq % count == index


def stripe_request(request: service_pb2.PullRequest, index: int, count: int) -> service_pb2.PullRequest:
    """A copy of ``request`` asking for stripe ``index`` of ``count`` (no stripe fields for one)."""
    out = service_pb2.PullRequest()
    out.CopyFrom(request)
    if count > 1:
        out.stream_index = index
        out.stream_count = count
    return out


def split_push(messages: Sequence[StreamItem], count: int) -> list[list[StreamItem]]:
    """An upload (open first, then chunks in seq order; no commit) as ``count`` stripes.

    Stripe ``i`` is the open and the ``i``-th of ``count`` contiguous, equal runs of chunks. A
    receiver takes a tensor's chunks only after its header (chunk 0), and stripes arrive in any
    interleaving, so a run that starts inside a tensor first carries that tensor's header chunk
    again: at most ``count - 1`` chunks travel twice, and the receiver keeps an identical resend
    once.

    Raises:
        ValueError: ``count`` < 1, the first message is no open, or a message after it is no chunk
            (the commit must follow every stripe: send it with ``CommitUpdate``).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not messages or kind_of(messages[0]) != "open":
        raise ValueError("an upload starts with its open")
    chunks = messages[1:]
    heads: dict[int, StreamItem] = {}  # tensor_idx -> its header chunk
    for m in chunks:
        chunk = chunk_of(m)
        if chunk is None:
            raise ValueError(f"a striped upload carries only chunks after its open, got {kind_of(m)!r}")
        if chunk.chunk_idx == 0:
            heads.setdefault(chunk.tensor_idx, m)
    stripes: list[list[StreamItem]] = []
    n = len(chunks)
    for i in range(count):
        run = chunks[i * n // count : (i + 1) * n // count]
        stripe: list[StreamItem] = [messages[0]]
        if run:
            first = chunk_of(run[0])
            assert first is not None
            head = heads.get(first.tensor_idx)
            if first.chunk_idx != 0 and head is not None:
                stripe.append(head)
        stripe.extend(run)
        stripes.append(stripe)
    return stripes


def merge_stripes(stripes: Sequence[Sequence[WireItem]]) -> list[WireItem]:
    """The one stream ``stripes`` were cut from: the open, every chunk in seq order, the commit.

    Nothing is verified here but that the stripes agree on their open and commit; the receiver
    checks the merged stream as any other (checksums, digests, completeness).

    Raises:
        StripeMismatchError: the stripes carry different opens or commits.
        StreamOrderError: a stripe does not start with an open.
    """
    if len(stripes) == 1:
        return list(stripes[0])
    opened: pb.StreamOpen | None = None
    commit: pb.Commit | None = None
    runs: list[list[tuple[int, int, WireItem]]] = []
    odd: list[WireItem] = []  # undecodable bytes and the like: the receiver refuses them
    for i, stripe in enumerate(stripes):
        if not stripe or kind_of(stripe[0]) != "open":
            raise StreamOrderError(f"stripe {i} does not start with an open")
        o = as_message(stripe[0]).open  # type: ignore[arg-type]
        if opened is None:
            opened = o
        elif o != opened:
            raise StripeMismatchError(
                f"stripe {i} is stream {o.upload_id!r} (v{o.target_version}), "
                f"stripe 0 is {opened.upload_id!r} (v{opened.target_version})"
            )
        run: list[tuple[int, int, WireItem]] = []
        for m in stripe[1:]:
            if isinstance(m, Undecodable):
                odd.append(m)
                continue
            chunk = chunk_of(m)
            if chunk is not None:
                run.append((chunk.seq, i, m))
            elif kind_of(m) == "commit":
                c = as_message(m).commit
                if commit is None:
                    commit = c
                elif c != commit:
                    raise StripeMismatchError(f"stripe {i} ends with a different commit")
            else:
                odd.append(m)
        run.sort(key=lambda x: x[0])  # a stripe arrives in seq order; sorting costs nothing then
        runs.append(run)
    assert opened is not None
    out: list[WireItem] = [pb.StreamMessage(open=opened)]
    out.extend(m for _, _, m in heapq.merge(*runs, key=lambda x: (x[0], x[1])))
    out.extend(odd)
    if commit is not None:
        out.append(pb.StreamMessage(commit=commit))
    return out


def run_all(calls: Sequence[Callable[[], T]], *, name: str = "stripe") -> list[T]:
    """Run ``calls`` at once, one thread each (the first in this thread); wait for all of them.

    Raises:
        the first failure (by call order) once every call has ended.
    """
    if len(calls) == 1:
        return [calls[0]()]
    results: list[T | None] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def one(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            errors[i] = err

    threads = [
        threading.Thread(target=one, args=(i,), name=f"{name}-{i}", daemon=True) for i in range(1, len(calls))
    ]
    for t in threads:
        t.start()
    one(0)
    for t in threads:
        t.join()
    for err in errors:
        if err is not None:
            raise err
    return results  # type: ignore[return-value]


def pull_striped(
    pull_one: Callable[[service_pb2.PullRequest], list[WireItem]],
    request: service_pb2.PullRequest,
    count: int,
    *,
    attempts: int = 3,
) -> list[WireItem]:
    """Pull ``count`` stripes of ``request`` at once (``pull_one`` pulls and resumes one) and merge them.

    A version may close between the stripes' starts; then the stripes that are not of the newest
    stream (highest ``target_version``) are pulled again, ``attempts`` times at most.

    Raises:
        StripeMismatchError: the stripes still disagree after ``attempts`` re-pulls.
        whatever ``pull_one`` raises.
    """

    def one(i: int) -> Callable[[], list[WireItem]]:
        return lambda: pull_one(stripe_request(request, i, count))

    stripes = run_all([one(i) for i in range(count)], name="pull-stripe")
    for _ in range(attempts):
        try:
            return merge_stripes(stripes)
        except StripeMismatchError:
            opens = [_open_of(s) for s in stripes]
            newest = max((o for o in opens if o is not None), key=lambda o: o.target_version, default=None)
            redo = [i for i, o in enumerate(opens) if o is None or o != newest]
            for i, again in zip(redo, run_all([one(i) for i in redo], name="pull-stripe"), strict=True):
                stripes[i] = again
    return merge_stripes(stripes)


def _open_of(stripe: Sequence[WireItem]) -> pb.StreamOpen | None:
    if stripe and kind_of(stripe[0]) == "open":
        return as_message(stripe[0]).open  # type: ignore[arg-type]
    return None


def push_striped(
    push_one: Callable[[Sequence[StreamItem]], service_pb2.PushReceipt],
    messages: Sequence[StreamItem],
    count: int,
    *,
    query: Callable[[], service_pb2.PushReceipt],
) -> service_pb2.PushReceipt:
    """Push an upload as ``count`` concurrent stripes (``push_one`` sends and resumes one stream).

    Returns:
        the server's receipt once every stripe has ended: the fullest stripe receipt when it holds
        every chunk, else a fresh one from ``query`` (``QueryUpload``), whose missing seqs then say
        what did not arrive.
    """
    stripes = split_push(messages, count)

    def one(stripe: list[StreamItem]) -> Callable[[], service_pb2.PushReceipt]:
        return lambda: push_one(stripe)

    receipts = run_all([one(s) for s in stripes], name="push-stripe")
    total = len(messages) - 1
    best = max(receipts, key=lambda r: r.num_chunks)
    if best.num_chunks == total and not best.missing_seqs:
        return best
    return query()
