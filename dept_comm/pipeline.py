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

import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import AbstractContextManager, nullcontext
from typing import Any, overload

import numpy as np
import torch

from dept_comm.digest import check_finite, count_nonfinite
from dept_comm.errors import CommitMismatchError
from dept_comm.frames import StreamItem, as_message, kind_of
from dept_comm.manifest import TensorStage, is_same_bytes
from dept_comm.pb import tensor_pb2 as pb

__all__ = ["ArrivalChecks", "PipelinedUpload", "checked_squared_norm", "squared_norm"]


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


def squared_norm(t: torch.Tensor, *, require_finite: bool = False, name: str = "") -> float:
    """A tensor's squared L2 norm for the outlier guard; integer tensors count 0.

    On the CPU: one float32 dot product per block of 64 Ki elements (relative error ~1e-7 per
    block), summed in float64, on the calling thread. torch's float64 norm ran on the intra-op
    thread pool, whose spinning workers cost the server about 1 CPU ms per MiB received: CPU the
    gRPC threads receiving the upload need (measured with dept-bench wire).

    ``require_finite``: raise NonFiniteError (naming ``name``) if any value is NaN or Inf. The
    same pass checks it: a sum of squares is finite only if every value is, so the values are
    counted only when the sum is not (then finite values whose float32 squares overflowed are
    summed again in float64). One read of the tensor instead of three (min, max, norm).
    """
    if not t.is_floating_point():
        return 0.0
    cpu32 = t.device.type == "cpu" and t.dtype == torch.float32
    if cpu32:
        total = _block_squares(t, np.float32)
    else:
        total = float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
    if math.isfinite(total):
        return total
    if require_finite:
        check_finite(t, name)
    elif count_nonfinite(t):
        return total
    # Every value finite: some float32 squares overflowed (float64 sums of any float dtype cannot).
    return _block_squares(t, np.float64) if cpu32 else total


def _block_squares(t: torch.Tensor, dtype: type[np.floating[Any]]) -> float:
    return _sum_in_order([_block_dots(t.detach().contiguous().reshape(-1).numpy(), dtype)])


def _block_dots(flat: np.ndarray[Any, Any], dtype: type[np.floating[Any]]) -> list[float]:
    """Each block's sum of squares, in ``dtype`` (overflow and NaN left to the caller's sum)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = []
        for i in range(0, flat.size, _NORM_BLOCK):
            block = flat[i : i + _NORM_BLOCK].astype(dtype, copy=False)
            out.append(float(np.dot(block, block)))
        return out


def _sum_in_order(runs: Iterable[list[float]]) -> float:
    total = 0.0  # one float64 addition after another, block by block: the same sum on every path
    for run in runs:
        for v in run:
            total += v
    return total


def _squares_by_chunk(stage: TensorStage) -> bool:
    """Whether a tensor's squares can be taken chunk by chunk as it arrives, adding up to exactly
    :func:`squared_norm`'s: float32 sent as its own bytes, staged in memory (each block then lies
    where the whole tensor's would, so each dot product is the same), cut at block boundaries."""
    spec = stage.spec
    return (
        stage.in_memory
        and spec.dtype == torch.float32
        and is_same_bytes(stage.codec.name, spec.dtype)
        and (stage.num_chunks == 1 or stage.step % (4 * _NORM_BLOCK) == 0)
    )


def checked_squared_norm(stage: TensorStage, require_finite: bool) -> float:
    """Decode a staged tensor keeping its bytes (digest, shape) and take its squared norm, with
    the finiteness check in the norm's own pass (see :func:`squared_norm`)."""
    t = stage.decode(False, release=False)
    return squared_norm(t, require_finite=require_finite, name=stage.spec.name)


class ArrivalChecks:
    """Each tensor's check, run once its last chunk arrived (``StreamReceiver(check_on_arrival=True)``).

    ``slots`` bounds how many checks run at once (a server's semaphore, shared with its commits):
    a check holds one decoded tensor, so memory stays one tensor per slot. With an ``executor``
    the checks run there, off the thread that receives the stream, so the next chunks are read
    while a tensor is checked (each check still takes a slot first). Whoever then holds a slot
    must not wait for a check (:meth:`settle` before taking one), or the two wait on each other.
    """

    def __init__(
        self, slots: AbstractContextManager[Any] | None = None, executor: Executor | None = None
    ) -> None:
        self.slots: AbstractContextManager[Any] = slots if slots is not None else nullcontext()
        self._executor = executor
        self._results: dict[int, float | Exception] = {}
        self._pending: dict[int, Future[None]] = {}
        self._dots: dict[int, list[list[float] | None]] = {}  # tensor -> each chunk's block squares
        self.by_chunk = 0  # tensors checked from their chunks' squares

    def chunk(self, idx: int, stage: TensorStage, chunk_idx: int) -> None:
        """Chunk ``chunk_idx`` of tensor ``idx`` was staged: take its blocks' squares now, from
        the staging while its bytes are in the cache (see :func:`_squares_by_chunk`), so that the
        tensor's check needs no pass of its own."""
        if not _squares_by_chunk(stage):
            return
        dots = self._dots.get(idx)
        if dots is None:
            dots = self._dots[idx] = [None] * stage.num_chunks
        dots[chunk_idx] = _block_dots(np.frombuffer(stage.view(chunk_idx), dtype=np.float32), np.float32)

    def submit(self, idx: int, stage: TensorStage, require_finite: bool) -> None:
        """Check tensor ``idx`` in a slot: on the executor if there is one (and it still takes
        work), else now. The stage's bytes must stay until the check ended (:meth:`settle`).

        A tensor whose chunks' squares were all taken as they came (:meth:`chunk`) and add up to
        a finite sum is checked here at once: its digest, and the sum as its squared norm (the
        same float64 additions in the same order as :func:`squared_norm`'s). A sum that is not
        finite goes the whole way (count the NaN/Inf, or sum again in float64)."""
        dots = self._dots.pop(idx, None)
        if dots is not None and all(d is not None for d in dots):
            total = _sum_in_order(d for d in dots if d is not None)
            if math.isfinite(total):
                self.by_chunk += 1
                try:
                    stage.verify_digest()
                    self._results[idx] = total
                except Exception as err:  # refused at the commit, as a check's error is
                    self._results[idx] = err
                return
        if self._executor is not None:
            try:
                self._pending[idx] = self._executor.submit(self._slotted, idx, stage, require_finite)
                return
            except RuntimeError:  # shut down (the server is stopping): check here
                pass
        self._slotted(idx, stage, require_finite)

    def _slotted(self, idx: int, stage: TensorStage, require_finite: bool) -> None:
        with self.slots:
            self.run(idx, stage, require_finite)

    def run(self, idx: int, stage: TensorStage, require_finite: bool) -> None:
        """Check tensor ``idx`` (digest, decode, shape, finite) keeping its staged bytes, and record
        its squared norm or the error; raises nothing (the commit raises it)."""
        try:
            self._results[idx] = checked_squared_norm(stage, require_finite)
        except Exception as err:  # refused at the commit, in tensor order, as before
            self._results[idx] = err

    def settle(self) -> None:
        """Wait until every submitted check ended."""
        for future in list(self._pending.values()):
            future.result()  # run() records errors instead of raising them

    def result(self, idx: int) -> float | None:
        """Tensor ``idx``'s squared norm (waiting for its check); None if it was not checked on arrival.

        Raises:
            whatever its check raised (CommitMismatchError, ManifestMismatchError, NonFiniteError...).
        """
        future = self._pending.get(idx)
        if future is not None:
            future.result()
        got = self._results.get(idx)
        if isinstance(got, Exception):
            raise got
        return got

    def __len__(self) -> int:
        return len(self._results)

    def clear(self) -> None:
        """Forget every result, once the checks ended."""
        self.settle()
        self._pending.clear()
        self._results.clear()
        self._dots.clear()
