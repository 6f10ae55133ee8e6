"""Pickle-free state files: nested state dicts as safetensors tensors plus a JSON skeleton, written atomically."""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

# The skeleton is the state with every tensor replaced by {"__tensor__": key}; dicts whose keys
# are not all plain strings (optimizer state is keyed by int) become {"__items__": [[k, v], ...]},
# tuples become {"__tuple__": [...]}, so load returns exactly the types that were saved.
_META_KEY = "dept_state"
_FORMAT = "dept-state-v1"


class _Flattener:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen: set[tuple[int, int]] = set()

    @staticmethod
    def _ident(t: torch.Tensor) -> tuple[int, int]:
        if t.numel() == 0:
            return (0, id(t))
        return (t.untyped_storage().data_ptr(), int(t.storage_offset()))

    def add_tensor(self, path: str, tensor: torch.Tensor) -> dict[str, str]:
        key = path or "_"
        while key in self.tensors:
            key += "'"
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        # safetensors refuses tensors that share memory; copy the rare aliased or strided ones.
        if self._ident(t) in self._seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        self._seen.add(self._ident(t))
        self.tensors[key] = t
        return {"__tensor__": key}

    def skeleton(self, obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.add_tensor(path, obj)
        if isinstance(obj, Mapping):
            keys = list(obj)
            if all(isinstance(k, str) and not k.startswith("__") for k in keys):
                return {k: self.skeleton(obj[k], f"{path}.{k}" if path else k) for k in keys}
            items = []
            for k in keys:
                if not isinstance(k, str | int | float | bool) and k is not None:
                    raise TypeError(f"state key {k!r} at {path!r} is not a JSON scalar")
                items.append([k, self.skeleton(obj[k], f"{path}.{k}" if path else str(k))])
            return {"__items__": items}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.skeleton(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.skeleton(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, str | int | float | bool):
            return obj
        raise TypeError(
            f"cannot store {type(obj).__name__} at {path!r}: only tensors, JSON scalars and containers"
        )


def _rebuild(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_rebuild(v, tensors) for v in node]
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__tuple__" in node:
            return tuple(_rebuild(v, tensors) for v in node["__tuple__"])
        if "__items__" in node:
            return {k: _rebuild(v, tensors) for k, v in node["__items__"]}
        return {k: _rebuild(v, tensors) for k, v in node.items()}
    return node


def _flatten(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    flat = _Flattener()
    skeleton = flat.skeleton(state, "")
    meta = {"format": _FORMAT, _META_KEY: json.dumps(skeleton, allow_nan=True)}
    return flat.tensors, meta


def _unflatten(
    meta: Mapping[str, str] | None, tensors: Mapping[str, torch.Tensor], origin: str
) -> dict[str, Any]:
    if not meta or meta.get("format") != _FORMAT or _META_KEY not in meta:
        raise ValueError(f"{origin}: not a dept state file (missing {_FORMAT} metadata)")
    state = _rebuild(json.loads(meta[_META_KEY]), tensors)
    if not isinstance(state, dict):
        raise ValueError(f"{origin}: state skeleton is not a mapping")
    return state


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    """Serialise a nested state (tensors, JSON scalars, dict/list/tuple) to safetensors bytes.

    Raises:
        TypeError: on values that are neither tensors, JSON scalars nor containers.
    """
    tensors, meta = _flatten(state)
    data: bytes = st_save(tensors, metadata=meta)
    return data


def state_from_bytes(data: bytes, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Inverse of :func:`state_to_bytes`.

    Raises:
        ValueError: if the bytes are not a dept state.
    """
    if len(data) < 8:
        raise ValueError("state bytes too short")
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    tensors = {k: v.to(device) for k, v in st_load(data).items()}
    return _unflatten(header.get("__metadata__"), tensors, "bytes")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder.

    Raises:
        TypeError: on values that cannot be stored.
    """
    target = Path(path)
    tensors, meta = _flatten(state)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def load_state(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a state written by :func:`save_state`, tensors placed on ``device``.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not a dept state file.
    """
    with safe_open(str(path), framework="pt", device=str(device)) as fh:
        meta = fh.metadata()
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return _unflatten(meta, tensors, str(path))


def clean_temp_files(directory: str | os.PathLike[str]) -> int:
    """Remove leftover ``.*.tmp-*`` files of interrupted saves; returns how many were removed."""
    removed = 0
    for leftover in Path(directory).glob(".*.tmp-*"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed
