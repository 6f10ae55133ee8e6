"""Tensor manifests (names, shapes, dtypes, groups), schema hashes and bit-exact body digests."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
import xxhash

from dept_comm.errors import ManifestMismatchError, NonFiniteError
from dept_comm.pb import tensor_pb2 as pb

__all__ = [
    "Group",
    "Manifest",
    "check_finite",
    "count_nonfinite",
    "TensorSpec",
    "dtype_from_pb",
    "dtype_to_pb",
    "manifest_of",
    "schema_hash",
    "tensors_digest",
]


class Group(IntEnum):
    """Accounting group of a tensor; mirrors ``dept.v1.TensorGroup``."""

    BODY = pb.TENSOR_GROUP_BODY
    EMBEDDINGS = pb.TENSOR_GROUP_EMBEDDINGS
    OTHER = pb.TENSOR_GROUP_OTHER

    @property
    def label(self) -> str:
        """Lower-case name used in metrics ("body", "embeddings", "other")."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a receiver expects of one tensor: its name, shape, wire dtype and group."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: Group

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


Manifest = Mapping[str, TensorSpec]

_DTYPE_TO_PB: dict[torch.dtype, pb.DType.ValueType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.int64: pb.DTYPE_INT64,
    torch.int32: pb.DTYPE_INT32,
}
_PB_TO_DTYPE: dict[int, torch.dtype] = {v: k for k, v in _DTYPE_TO_PB.items()}


def dtype_to_pb(dtype: torch.dtype) -> pb.DType.ValueType:
    """The ``dept.v1.DType`` value of ``dtype``.

    Raises:
        ManifestMismatchError: the dtype has no wire representation.
    """
    try:
        return _DTYPE_TO_PB[dtype]
    except KeyError:
        known = ", ".join(str(d) for d in _DTYPE_TO_PB)
        raise ManifestMismatchError(f"dtype {dtype} cannot go on the wire; supported: {known}") from None


def dtype_from_pb(value: int) -> torch.dtype:
    """The torch dtype of a ``dept.v1.DType`` value.

    Raises:
        ManifestMismatchError: unknown or unspecified value.
    """
    try:
        return _PB_TO_DTYPE[value]
    except KeyError:
        raise ManifestMismatchError(f"unknown wire dtype {value}; known: {sorted(_PB_TO_DTYPE)}") from None


def manifest_of(
    tensors: Mapping[str, torch.Tensor], group: Group | Mapping[str, Group] = Group.BODY
) -> dict[str, TensorSpec]:
    """Describe ``tensors``; ``group`` is one group for all, or a group per name (default BODY).

    Raises:
        KeyError: a per-name group mapping lacks one of the names.
    """
    out: dict[str, TensorSpec] = {}
    for name, t in tensors.items():
        g = group if isinstance(group, Group) else group[name]
        out[name] = TensorSpec(name, tuple(int(d) for d in t.shape), t.dtype, Group(g))
    return out


def _dtype_tag(dtype: torch.dtype) -> bytes:
    return str(dtype).removeprefix("torch.").encode()


def _update_spec(h: xxhash.xxh3_128, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    # Length-prefixed fields so that no two different schemas serialise to the same bytes.
    name_b = name.encode()
    tag = _dtype_tag(dtype)
    h.update(struct.pack("<I", len(name_b)) + name_b)
    h.update(struct.pack(f"<I{len(shape)}q", len(shape), *shape))
    h.update(struct.pack("<I", len(tag)) + tag)


def schema_hash(manifest: Manifest) -> bytes:
    """xxh3-128 over the sorted names, shapes and dtypes of ``manifest`` (16 bytes)."""
    h = xxhash.xxh3_128()
    for name in sorted(manifest):
        spec = manifest[name]
        _update_spec(h, name, spec.shape, spec.dtype)
    return h.digest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """xxh3-128 over names, shapes, dtypes and raw bytes in sorted-name order (16 bytes).

    Two replicas have the same digest iff their tensors are bit-identical; tensors are read on
    the CPU in contiguous layout, one at a time.
    """
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name].detach()
        _update_spec(h, name, tuple(int(d) for d in t.shape), t.dtype)
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.digest()


_BLOCK = 1 << 20  # elements per pass: bounds the temporary mask, keeps the loop off elements


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf elements of a tensor (0 for integer dtypes); a CPU tensor is read with
    numpy, a device tensor is counted on its device.

    A finite tensor costs one min and one max pass (numpy propagates NaN through both and runs
    several times faster than torch.isfinite here); elements are counted only when one is bad.
    bfloat16, which numpy lacks, is tested on its exponent bits.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if t.device.type != "cpu":  # counted where the tensor lives: only the count crosses
        return int((~torch.isfinite(t.detach())).sum().item())
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        bits = flat.view(torch.int16).numpy().view(np.uint16)
        return sum(
            int(np.count_nonzero((bits[i : i + _BLOCK] & 0x7F80) == 0x7F80))
            for i in range(0, bits.size, _BLOCK)
        )
    arr = flat.numpy()
    if np.isfinite(arr.min()) and np.isfinite(arr.max()):
        return 0
    return sum(
        int(arr[i : i + _BLOCK].size - np.count_nonzero(np.isfinite(arr[i : i + _BLOCK])))
        for i in range(0, arr.size, _BLOCK)
    )


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise NonFiniteError, naming tensor ``name`` and counting the values, if ``t`` holds NaN or Inf."""
    bad = count_nonfinite(t)
    if bad:
        raise NonFiniteError(f"tensor {name!r} has {bad} non-finite values of {t.numel()}")
