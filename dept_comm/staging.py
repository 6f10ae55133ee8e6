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
import threading
import uuid
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

__all__ = ["Backing", "FileBacking", "MemoryBacking", "StagingArea", "UploadStaging", "STAGING_SUFFIX"]

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".dept-staging"


class Backing(Protocol):
    """One tensor's encoded bytes: written chunk by chunk, read back whole or by range."""

    size: int

    def write(self, offset: int, data: bytes | memoryview | np.ndarray) -> None: ...

    def read(self, offset: int, length: int) -> memoryview: ...

    def release(self) -> None: ...


class MemoryBacking:
    """A uint8 buffer in memory (pages are touched as data arrives)."""

    def __init__(self, size: int, on_release: object = None) -> None:
        self.size = size
        self.tensor: torch.Tensor | None = torch.empty(size, dtype=torch.uint8)
        self.array: np.ndarray | None = self.tensor.numpy()
        self._on_release = on_release

    def write(self, offset: int, data: bytes | memoryview | np.ndarray) -> None:
        assert self.array is not None
        view = np.frombuffer(data, dtype=np.uint8)
        self.array[offset : offset + len(view)] = view

    def read(self, offset: int, length: int) -> memoryview:
        assert self.array is not None
        return self.array[offset : offset + length].data

    def release(self) -> None:
        if self.array is not None:
            self.array = self.tensor = None
            if callable(self._on_release):
                self._on_release(self.size)


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
                return MemoryBacking(size, on_release=self._released)
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

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self._memory_bytes + size > self.memory_budget_bytes:
                return False
            self._memory_bytes += size
            return True

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
