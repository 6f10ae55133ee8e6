"""Atomic, pickle-free checkpoints: safetensors groups plus a JSON manifest written last as the commit marker.

Layout::

    directory/.lock                          flock'ed by the one store (server) that owns the directory
    directory/step-00000042/body.safetensors  one file per named tensor group
    directory/step-00000042/manifest.json     size, xxh3-128 and sha256 of every file, the meta, and
                                             a digest of itself; a step without it is incomplete

Every file is written as a temp file in its final directory, flushed, fsync'ed, renamed over the
final name with ``os.replace`` and the directory fsync'ed. A step counts only once its manifest
exists and every digest verifies, so a crash at any moment leaves the previous step loadable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import xxhash

from dept_comm.errors import DeptError, InvalidInputError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_MARK = ".tmp-"


class CheckpointLockedError(DeptError):
    """Another process (another server) holds the checkpoint directory."""

    status = "FAILED_PRECONDITION"


class CheckpointCorruptError(DeptError):
    """A checkpoint step whose manifest or files do not verify."""

    status = "DATA_LOSS"


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    """One verified checkpoint: tensor groups (CPU tensors) and the JSON meta saved with them."""

    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """temp file in the same directory -> write -> fsync -> os.replace -> fsync(directory)."""
    tmp = path.parent / f".{path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _for_safetensors(group: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are copied (safetensors refuses them)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in group.items():
        x = t.detach().to("cpu").contiguous()
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen and x.numel() > 0:
            x = x.clone()
        seen.add(x.untyped_storage().data_ptr())
        out[name] = x
    return out


def _file_entry(data: bytes) -> dict[str, Any]:
    return {
        "bytes": len(data),
        "xxh3_128": xxhash.xxh3_128_hexdigest(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


class CheckpointStore:
    """The checkpoints of one run in one directory, owned by one process at a time.

    Args:
        directory: created if missing.
        keep: how many complete steps to keep (older ones are pruned after each save).

    Raises:
        CheckpointLockedError: another process holds ``directory/.lock``.
    """

    def __init__(self, directory: Path | str, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_path = self.directory / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise CheckpointLockedError(
                    f"checkpoint directory {self.directory} is locked by another server (pid {holder}); "
                    "stop it or use another directory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd: int | None = fd
        self._remove_orphans()

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the directory lock (idempotent)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise InvalidInputError(f"checkpoint store for {self.directory} is closed")

    def _remove_orphans(self) -> None:
        """Delete temp files of interrupted writes and step directories that never got a manifest."""
        removed = 0
        for path in self.directory.iterdir():
            if _TMP_MARK in path.name:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
            elif path.is_dir() and _STEP_RE.match(path.name):
                for inner in path.iterdir():
                    if _TMP_MARK in inner.name:
                        inner.unlink()
                        removed += 1
                if not (path / MANIFEST).exists():
                    shutil.rmtree(path)
                    removed += 1
        if removed:
            _fsync_dir(self.directory)
            logger.info("checkpoint_orphans_removed dir=%s count=%d", self.directory, removed)

    # -- writing ---------------------------------------------------------------------------

    def _step_dir(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def steps(self) -> list[int]:
        """Steps that have a manifest (not yet verified), ascending."""
        found = []
        for path in self.directory.iterdir():
            m = _STEP_RE.match(path.name)
            if m and (path / MANIFEST).exists():
                found.append(int(m.group(1)))
        return sorted(found)

    def save(
        self, step: int, tensors: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping[str, Any]
    ) -> Path:
        """Write ``step`` atomically and prune all but the newest ``keep`` steps.

        Args:
            step: non-negative step number (e.g. the body version); saving an existing step
                replaces it (its manifest is removed first, so it is never half old, half new).
            tensors: named groups, e.g. ``{"body": ..., "embeddings": ..., "outer": ...}``; group
                names are file names (letters, digits, ``_.-``).
            meta: JSON-serialisable data saved in the manifest (no NaN or Inf).

        Returns:
            The step directory.

        Raises:
            InvalidInputError: bad step, group name or meta.
        """
        self._check_open()
        if step < 0:
            raise InvalidInputError(f"checkpoint step must be non-negative, got {step}")
        for group in tensors:
            if not _GROUP_RE.match(group) or _TMP_MARK in group or group == "manifest":
                raise InvalidInputError(f"checkpoint group name {group!r} is not a plain file name")
        try:
            meta_json = json.loads(_canonical(dict(meta)))
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"checkpoint meta must be JSON without NaN/Inf: {err}") from None

        step_dir = self._step_dir(step)
        if step_dir.exists():
            with contextlib.suppress(FileNotFoundError):
                (step_dir / MANIFEST).unlink()  # uncommit before overwriting
            _fsync_dir(step_dir)
        else:
            step_dir.mkdir()
            _fsync_dir(self.directory)
        files: dict[str, dict[str, Any]] = {}
        for group, group_tensors in tensors.items():
            data = safetensors.torch.save(_for_safetensors(group_tensors))
            _write_atomic(step_dir / f"{group}.safetensors", data)
            files[group] = _file_entry(data)
        payload = {"format": FORMAT_VERSION, "step": step, "files": files, "meta": meta_json}
        manifest = {"payload": payload, "xxh3_128": xxhash.xxh3_128_hexdigest(_canonical(payload))}
        _write_atomic(step_dir / MANIFEST, _canonical(manifest))  # the commit marker, last
        logger.info(
            "checkpoint_saved step=%d groups=%d bytes=%d",
            step,
            len(files),
            sum(f["bytes"] for f in files.values()),
        )
        self._prune(step)
        return step_dir

    def _prune(self, just_saved: int) -> None:
        # the newest `keep` steps stay; the one just saved (and anything newer) is never deleted
        stale = [s for s in self.steps()[: -self.keep] if s < just_saved]
        for s in stale:
            path = self._step_dir(s)
            (path / MANIFEST).unlink()  # uncommit first: a crash mid-delete leaves an orphan
            _fsync_dir(path)
            shutil.rmtree(path)
            logger.debug("checkpoint_pruned step=%d", s)
        if stale:
            _fsync_dir(self.directory)

    # -- reading ---------------------------------------------------------------------------

    def load(self, step: int) -> Checkpoint:
        """Load and verify one step.

        Raises:
            CheckpointCorruptError: missing or unreadable files, digest or format mismatch.
        """
        step_dir = self._step_dir(step)
        try:
            raw = (step_dir / MANIFEST).read_bytes()
            manifest = json.loads(raw)
            payload = manifest["payload"]
            if _canonical(manifest) != raw:
                raise CheckpointCorruptError(f"manifest of step {step} is not in canonical form")
            if xxhash.xxh3_128_hexdigest(_canonical(payload)) != manifest["xxh3_128"]:
                raise CheckpointCorruptError(f"manifest of step {step} fails its own digest")
            if payload["format"] != FORMAT_VERSION or payload["step"] != step:
                raise CheckpointCorruptError(
                    f"manifest of step {step} has format {payload['format']} and step {payload['step']}"
                )
            groups: dict[str, dict[str, torch.Tensor]] = {}
            for group, entry in payload["files"].items():
                data = (step_dir / f"{group}.safetensors").read_bytes()
                if _file_entry(data) != entry:
                    raise CheckpointCorruptError(f"{group}.safetensors of step {step} fails its digest")
                groups[group] = safetensors.torch.load(data)
            meta = payload["meta"]
        except CheckpointCorruptError:
            raise
        except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as err:
            raise CheckpointCorruptError(f"checkpoint step {step} is unreadable: {err!r}") from err
        if not isinstance(meta, dict):
            raise CheckpointCorruptError(f"meta of step {step} is not an object")
        return Checkpoint(step=step, tensors=groups, meta=meta)

    def latest(self) -> Checkpoint | None:
        """The newest step that verifies, falling back to older ones; ``None`` when none does."""
        self._check_open()
        for step in reversed(self.steps()):
            try:
                ckpt = self.load(step)
            except CheckpointCorruptError as err:
                logger.warning("checkpoint_skipped step=%d reason=%s", step, err)
                continue
            logger.info("checkpoint_loaded step=%d", step)
            return ckpt
        return None
