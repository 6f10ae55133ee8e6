"""Where a receiver keeps an upload's encoded bytes until they are decoded: memory up to a budget,
then files.

A :class:`StagingArea` is shared by every upload a server holds. It hands each upload an
:class:`UploadStaging`, which gives each tensor of that upload a :class:`Backing` of its encoded
size: memory while the area's in-memory bytes stay within ``memory_budget_bytes``, otherwise a
region of the upload's own file in ``directory`` (created on its first spilled tensor, written
with ``pwrite`` and read back with ``pread``, so spilled bytes sit in the page cache, not in the
process's resident set). Closing the upload (folded, superseded, expired, dropped) returns its
memory to the budget and removes its file. Files are named by a random id, never by anything a
client sent; :meth:`StagingArea.clean_stale` removes what an earlier process left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "Backing",
    "FileBacking",
    "MemoryBacking",
    "StagingArea",
    "UploadStaging",
    "STAGING_SUFFIX",
    "STAGING_KEEP_S",
]

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".dept-staging"
STAGING_KEEP_S = 120.0  # kept staging buffers unused this long go (StagingArea.trim, on the server's ticker)


class Backing(Protocol):
    """One tensor's encoded bytes: written chunk by chunk, read back whole or by range."""

    size: int

    def write(self, offset: int, data: bytes | memoryview | np.ndarray) -> None: ...

    def read(self, offset: int, length: int) -> memoryview: ...

    def release(self) -> None: ...


class MemoryBacking:
    """A uint8 buffer in memory (pages are touched as data arrives).

    ``buffer`` is a recycled buffer of ``size`` bytes to use instead of a new one (its old bytes
    are not cleared: as with ``torch.empty``, every byte is written before it is read). On
    release, ``recycle`` (if given) gets the buffer back, but only when nothing else holds it: a
    same-bytes tensor decoded from the staging *is* the buffer, and a view of it keeps it out of
    any pool.
    """

    def __init__(
        self,
        size: int,
        on_release: object = None,
        *,
        buffer: torch.Tensor | None = None,
        recycle: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.size = size
        self.tensor: torch.Tensor | None = (
            buffer if buffer is not None else torch.empty(size, dtype=torch.uint8)
        )
        self.array: np.ndarray | None = self.tensor.numpy()
        self._on_release = on_release
        self._recycle = recycle

    def write(self, offset: int, data: bytes | memoryview | np.ndarray) -> None:
        assert self.array is not None
        view = np.frombuffer(data, dtype=np.uint8)
        self.array[offset : offset + len(view)] = view

    def read(self, offset: int, length: int) -> memoryview:
        assert self.array is not None
        return self.array[offset : offset + length].data

    def release(self) -> None:
        if self.array is not None:
            unshared = self._recycle is not None and self._unshared()
            tensor, self.array, self.tensor = self.tensor, None, None
            if callable(self._on_release):
                self._on_release(self.size)
            if unshared and self._recycle is not None and tensor is not None:
                self._recycle(tensor)

    def _unshared(self) -> bool:
        """Whether only this backing holds its buffer (as a fresh one does)."""
        return _UNSHARED is not None and self._holders() == _UNSHARED

    def _holders(self) -> tuple[int, int, int] | None:
        return _holders(self.tensor, self.array)


def _holders(tensor: torch.Tensor | None, array: np.ndarray | None) -> tuple[int, int, int] | None:
    """Who holds a buffer: references to the tensor and its array, and users of its storage (torch
    views); None where torch cannot tell (then nothing is recycled)."""
    try:
        uses = int(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return None
    return sys.getrefcount(tensor), sys.getrefcount(array), uses


_UNSHARED: tuple[int, int, int] | None = None
_UNSHARED = MemoryBacking(16)._holders()  # a fresh backing that nothing else holds, seen the same way


class FileBacking:
    """A region ``[base, base + size)`` of an upload's staging file."""

    def __init__(self, owner: UploadStaging, base: int, size: int) -> None:
        self.size = size
        self._owner = owner
        self._base = base

    def write(self, offset: int, data: bytes | memoryview | np.ndarray) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else data.data.cast("B")
        fd = self._owner.fd()
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], self._base + offset + done)

    def read(self, offset: int, length: int) -> memoryview:
        out = bytearray(length)
        view = memoryview(out)
        fd = self._owner.fd()
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], self._base + offset + done)
            if n <= 0:
                raise OSError(f"staging file {self._owner.path} is shorter than expected")
            done += n
        return view

    def release(self) -> None:
        pass  # the file goes with its upload


class UploadStaging:
    """One upload's staging: memory backings within the area's budget, the rest in one file."""

    def __init__(self, area: StagingArea) -> None:
        self._area = area
        self._lock = threading.Lock()
        self._memory_bytes = 0
        self._file_end = 0
        self._fd: int | None = None
        self.path: Path | None = None
        self._closed = False

    def allocate(self, size: int) -> Backing:
        """A backing of ``size`` bytes: memory if the area's budget allows, else file space."""
        with self._lock:
            if self._closed:
                raise RuntimeError("staging of a closed upload")
            if self._area.reserve(size):
                self._memory_bytes += size
                return MemoryBacking(
                    size, on_release=self._released, buffer=self._area.take(size), recycle=self._area.recycle
                )
            if self._fd is None:
                self.path = self._area.new_file_path()
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            base = self._file_end
            self._file_end += size
            return FileBacking(self, base, size)

    def fd(self) -> int:
        if self._fd is None:
            raise RuntimeError("staging file is closed")
        return self._fd

    def _released(self, size: int) -> None:
        with self._lock:
            self._memory_bytes -= size
        self._area.unreserve(size)

    @property
    def file_bytes(self) -> int:
        return self._file_end

    def close(self) -> None:
        """Remove the file and give this upload's remaining memory back to the budget."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            held, self._memory_bytes = self._memory_bytes, 0
            fd, self._fd = self._fd, None
        self._area.unreserve(held)
        if fd is not None:
            os.close(fd)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class StagingArea:
    """The server-wide staging budget and directory.

    Released in-memory buffers are kept for the next uploads' tensors of the same size (a fresh
    buffer's first touch costs ~0.5 ms per MiB in page faults on the 2-core sandbox, copying into a
    reused one ~0.05-0.08; ``dept-bench wire``'s push, benchmarks/results/2026-11-28-cpu-wire).
    Kept buffers count against the same budget: staged plus kept bytes never exceed
    ``memory_budget_bytes`` (kept ones are dropped first when a new tensor needs the room), and
    :meth:`trim` drops those unused for ``idle_s``.

    Args:
        directory: where spilled uploads go (created if missing).
        memory_budget_bytes: encoded bytes of all open uploads held in memory at most.
    """

    def __init__(self, directory: Path, memory_budget_bytes: int) -> None:
        if memory_budget_bytes < 0:
            raise ValueError(f"staging memory budget must be >= 0, got {memory_budget_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.memory_budget_bytes = memory_budget_bytes
        self._lock = threading.Lock()
        self._memory_bytes = 0
        self._kept: dict[int, list[tuple[float, torch.Tensor]]] = {}  # size -> (released at, buffer)
        self._kept_bytes = 0

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self._memory_bytes + size > self.memory_budget_bytes:
                return False
            self._memory_bytes += size
            self._make_room_locked(size)
            return True

    def _make_room_locked(self, size: int) -> None:
        """Drop kept buffers (other sizes first, oldest first) until staged + kept bytes fit."""
        while self._kept_bytes and self._memory_bytes + self._kept_bytes > self.memory_budget_bytes:
            sizes = sorted(self._kept, key=lambda s: (s == size, self._kept[s][0][0]))
            victim = sizes[0]
            self._kept[victim].pop(0)
            if not self._kept[victim]:
                del self._kept[victim]
            self._kept_bytes -= victim

    def take(self, size: int) -> torch.Tensor | None:
        """A kept buffer of ``size`` bytes for a tensor just reserved, or None."""
        with self._lock:
            kept = self._kept.get(size)
            if not kept:
                return None
            _, buffer = kept.pop()
            if not kept:
                del self._kept[size]
            self._kept_bytes -= size
            return buffer

    def recycle(self, buffer: torch.Tensor) -> None:
        """Keep a released buffer (nothing else holds it) if the budget has room for it."""
        size = buffer.numel()
        with self._lock:
            if self._memory_bytes + self._kept_bytes + size <= self.memory_budget_bytes:
                self._kept.setdefault(size, []).append((time.monotonic(), buffer))
                self._kept_bytes += size

    def trim(self, idle_s: float = 0.0) -> int:
        """Drop kept buffers released more than ``idle_s`` ago; returns the bytes dropped."""
        cutoff = time.monotonic() - idle_s
        dropped = 0
        with self._lock:
            for size in list(self._kept):
                fresh = [(t, b) for t, b in self._kept[size] if t > cutoff]
                dropped += size * (len(self._kept[size]) - len(fresh))
                if fresh:
                    self._kept[size] = fresh
                else:
                    del self._kept[size]
            self._kept_bytes -= dropped
        return dropped

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    def unreserve(self, size: int) -> None:
        with self._lock:
            self._memory_bytes -= size

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    def new_file_path(self) -> Path:
        return self.directory / f"upload-{uuid.uuid4().hex}{STAGING_SUFFIX}"

    def upload(self) -> UploadStaging:
        return UploadStaging(self)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{STAGING_SUFFIX}"))

    def clean_stale(self) -> int:
        """Remove staging files an earlier process left (call before serving); returns how many."""
        removed = 0
        for path in self.files():
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            logger.info("staging_cleaned files=%d dir=%s", removed, self.directory)
        return removed
