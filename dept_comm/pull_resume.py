"""A pull that survives cuts: keep what arrived, and ask the server to go on from the first chunk
still missing instead of sending the whole body again.

The server names every pull stream (its open's ``upload_id`` and ``target_digest``); a retry
carries them with ``resume_from_seq``. If the server still sends that stream it skips the chunks
before the seq, and the held messages plus the new ones make the whole stream. If it sends
another stream (a round closed meanwhile), its open differs and what was held is dropped. The
receiver verifies the result as any pull (chunk checksums, tensor digests, commit digest, and
the replica's digest after applying it), so a resumed pull is exactly as trustworthy.
"""

from __future__ import annotations

from typing import Literal

from dept_comm.frames import Undecodable, WireItem, as_message, chunk_of, kind_of
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb

__all__ = ["PullProgress"]


class PullProgress:
    """The messages of one pull so far, across cut attempts."""

    def __init__(self, request: service_pb2.PullRequest, *, keep_chunks: bool = True) -> None:
        """``keep_chunks=False``: hold only the open and the commit (a caller whose sink takes
        each chunk as it arrives: a resume needs only the open and the next seq)."""
        self._request = request
        self._keep_chunks = keep_chunks
        self._open: pb.StreamOpen | None = None
        self._held: list[WireItem] = []
        self._next_seq = 0
        self.resumes = 0

    @property
    def next_seq(self) -> int:
        """The first chunk seq not yet held."""
        return self._next_seq

    def next_request(self) -> service_pb2.PullRequest:
        """The request for the next attempt: the original one, plus where to go on from."""
        if self._open is None or self._next_seq == 0:
            return self._request
        self.resumes += 1
        request = service_pb2.PullRequest()
        request.CopyFrom(self._request)
        request.resume_from_seq = self._next_seq
        request.resume_upload_id = self._open.upload_id
        request.resume_target_digest = self._open.target_digest
        return request

    def add(self, msg: WireItem) -> Literal["kept", "afresh"] | None:
        """Take one message of the current attempt: "kept" (held after what was), "afresh" (the
        open of another stream: what was held is dropped), or None (already held, not kept)."""
        if isinstance(msg, Undecodable):
            self._held.append(msg)  # the receiver refuses it with the reason
            return "kept"
        kind = kind_of(msg)
        if kind == "open":
            opened = as_message(msg).open
            if self._open is not None and opened == self._open:
                return None  # the same stream again: go on with what is held
            afresh = self._open is not None
            self._open, self._held, self._next_seq = opened, [msg], 0  # another stream: afresh
            return "afresh" if afresh else "kept"
        chunk = chunk_of(msg)
        if chunk is not None:
            if chunk.seq < self._next_seq:
                return None  # already held (a server that did not skip)
            self._next_seq = chunk.seq + 1
            if not self._keep_chunks:
                return "kept"  # the caller's sink has it
        self._held.append(msg)
        return "kept"

    def messages(self) -> list[WireItem]:
        """Everything held: the open, the chunks in order (unless not kept), and the commit once it came."""
        return list(self._held)
