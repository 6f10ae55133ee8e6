"""Pipelining: an upload is sent while it is encoded, and a receiver checks (or decodes) each tensor
as soon as its last chunk arrived instead of all of them at the end.

:class:`PipelinedUpload` runs ``encode_stream`` on a background thread. The push stream follows it
message by message (:meth:`PipelinedUpload.follow`), so encoding tensor *k+1* overlaps sending
tensor *k*. Every message is kept as it is made: after a cut the upload is a plain sequence again
and a retry resends only the chunks the server lacks (``dept_comm.streaming.unsent``). The encoder
is the same generator the sequential path runs, in the same order, so the bytes (and the
error-feedback state left behind) are the same.

:class:`ArrivalChecks` is what a server's receiver learnt of each tensor when its last chunk
arrived: its squared L2 norm, or the error its check raised (payload digest, shape, finite values).
Nothing is folded on arrival: the commit still verifies the stream's digest, raises the first
recorded error (in tensor order, as a check at the commit would) and sums the cached norms for the
outlier guard; tensors not checked on arrival are checked then, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, overload

import numpy as np
import torch

from dept_comm.errors import CommitMismatchError
from dept_comm.frames import StreamItem, as_message, kind_of
from dept_comm.manifest import TensorStage
from dept_comm.pb import tensor_pb2 as pb

__all__ = ["ArrivalChecks", "PipelinedUpload", "squared_norm"]


class PipelinedUpload(Sequence[StreamItem]):
    """An upload stream (open and chunks) encoded on a background thread while it is sent.

    ``source`` yields the open, the chunks and a final commit (``encode_stream``); the commit is kept
    apart (:attr:`commit`) since it goes with ``CommitUpdate``, not in the push stream. As a
    sequence (``len``, indexing, iteration) it waits for the encoder to finish, except that
    ``upload[i]`` for ``i >= 0`` waits only for message ``i``. An error of the encoder ends
    :meth:`follow` early and is raised by :meth:`wait` and everything that waits.

    Memory: the encoded messages, as the sequential path's list holds them (a resend needs them).
    """

    def __init__(self, source: Iterable[StreamItem], *, name: str = "encode-upload") -> None:
        self._items: list[StreamItem] = []
        self._commit: pb.Commit | None = None
        self._error: BaseException | None = None
        self._done = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(iter(source),), name=name, daemon=True)
        self._thread.start()

    def _run(self, source: Iterator[StreamItem]) -> None:
        try:
            for item in source:
                with self._cond:
                    if kind_of(item) == "commit":
                        self._commit = as_message(item).commit
                    else:
                        self._items.append(item)
                    self._cond.notify_all()
        except BaseException as err:  # handed to whoever waits
            self._error = err
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self._done

    def follow(self) -> Iterator[StreamItem]:
        """Every message in order, each as soon as it was encoded; stops early if encoding failed."""
        sent = 0
        while True:
            with self._cond:
                while sent >= len(self._items) and not self._done:
                    self._cond.wait()
                ready = self._items[sent:]
            if not ready:
                return
            yield from ready
            sent += len(ready)

    def wait(self) -> list[StreamItem]:
        """Every message (not the commit) once encoding finished; raises the encoder's error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._items

    @property
    def commit(self) -> pb.Commit:
        """The stream's commit (waits for the encoder)."""
        self.wait()
        if self._commit is None:
            raise CommitMismatchError("the encoded upload stream ended without a commit")
        return self._commit

    def __len__(self) -> int:
        return len(self.wait())

    @overload
    def __getitem__(self, index: int) -> StreamItem: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[StreamItem]: ...
    def __getitem__(self, index: int | slice) -> StreamItem | Sequence[StreamItem]:
        if isinstance(index, int) and index >= 0:
            with self._cond:
                while index >= len(self._items) and not self._done:
                    self._cond.wait()
                if index < len(self._items):
                    return self._items[index]
        return self.wait()[index]


_NORM_BLOCK = 1 << 16  # float32 elements per dot product; the blocks' sums add up in float64


def squared_norm(t: torch.Tensor) -> float:
    """A tensor's squared L2 norm for the outlier guard; integer tensors count 0.

    On the CPU: one float32 dot product per block of 64 Ki elements (relative error ~1e-7 per
    block), summed in float64, on the calling thread. torch's float64 norm ran on the intra-op
    thread pool, whose spinning workers cost the server about 1 CPU ms per MiB received: CPU the
    gRPC threads receiving the upload need (measured with dept-bench wire).
    """
    if not t.is_floating_point():
        return 0.0
    if t.device.type != "cpu" or t.dtype != torch.float32:
        return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
    flat = t.detach().contiguous().reshape(-1).numpy()
    total = 0.0
    for i in range(0, flat.size, _NORM_BLOCK):
        block = flat[i : i + _NORM_BLOCK]
        total += float(np.dot(block, block))
    return total


class ArrivalChecks:
    """Each tensor's check, run once its last chunk arrived (``StreamReceiver(check_on_arrival=True)``).

    ``slots`` bounds how many checks run at once (a server's semaphore, shared with its commits):
    a check holds one decoded tensor, so memory stays one tensor per slot.
    """

    def __init__(self, slots: AbstractContextManager[Any] | None = None) -> None:
        self.slots: AbstractContextManager[Any] = slots if slots is not None else nullcontext()
        self._results: dict[int, float | Exception] = {}

    def run(self, idx: int, stage: TensorStage, require_finite: bool) -> None:
        """Check tensor ``idx`` (digest, decode, shape, finite) keeping its staged bytes, and record
        its squared norm or the error; raises nothing (the commit raises it)."""
        try:
            self._results[idx] = squared_norm(stage.decode(require_finite, release=False))
        except Exception as err:  # refused at the commit, in tensor order, as before
            self._results[idx] = err

    def result(self, idx: int) -> float | None:
        """Tensor ``idx``'s squared norm; None if it was not checked on arrival.

        Raises:
            whatever its check raised (CommitMismatchError, ManifestMismatchError, NonFiniteError...).
        """
        got = self._results.get(idx)
        if isinstance(got, Exception):
            raise got
        return got

    def __len__(self) -> int:
        return len(self._results)

    def clear(self) -> None:
        self._results.clear()
