"""``fp32`` (raw float32, the reference every ratio is quoted against) and ``raw`` (any dtype)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from dept_comm.codecs.base import ParameterlessCodec, register_codec
from dept_comm.errors import ManifestMismatchError, SizeLimitError

_NUMPY_DTYPE: dict[torch.dtype, str] = {
    torch.float32: "<f4",
    torch.float16: "<f2",
    torch.int64: "<i8",
    torch.int32: "<i4",
}


def _raw_decode(
    data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype, codec: str
) -> torch.Tensor:
    if dtype == torch.bfloat16:
        item = 2
    elif dtype in _NUMPY_DTYPE:
        item = np.dtype(_NUMPY_DTYPE[dtype]).itemsize
    else:
        raise ManifestMismatchError(f"{codec} codec cannot decode dtype {dtype}")
    numel = math.prod(shape)
    if len(data) != item * numel:
        raise SizeLimitError(
            f"{codec} payload is {len(data)} bytes, shape {list(shape)} needs {item * numel}"
        )
    if dtype == torch.bfloat16:
        arr = np.frombuffer(data, dtype="<u2").reshape(tuple(shape))
        return torch.from_numpy(arr.astype(np.int16)).view(torch.bfloat16)
    arr = np.frombuffer(data, dtype=_NUMPY_DTYPE[dtype]).reshape(tuple(shape))
    return torch.from_numpy(arr.copy())


class Fp32(ParameterlessCodec):
    """Lossless float32 codec (no compression); decodes to any floating dtype."""

    name: ClassVar[str] = "fp32"
    lossless: ClassVar[bool] = True

    def encode(self, x: torch.Tensor) -> bytes:
        arr = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        return arr.astype("<f4", copy=False).tobytes()

    def decode(
        self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        if not dtype.is_floating_point:
            raise ManifestMismatchError(f"fp32 codec cannot decode dtype {dtype}")
        out = _raw_decode(data, shape, torch.float32, self.name)
        return out if dtype == torch.float32 else out.to(dtype)

    def max_encoded_bytes(self, numel: int) -> int:
        return 4 * numel


class Raw(ParameterlessCodec):
    """Lossless bytes of the tensor in its own dtype (for integer tensors such as token ids)."""

    name: ClassVar[str] = "raw"
    lossless: ClassVar[bool] = True

    def encode(self, x: torch.Tensor) -> bytes:
        t = x.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
        if t.dtype not in _NUMPY_DTYPE:
            raise ManifestMismatchError(f"raw codec cannot encode dtype {t.dtype}")
        return t.numpy().astype(_NUMPY_DTYPE[t.dtype], copy=False).tobytes()

    def decode(
        self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return _raw_decode(data, shape, dtype, self.name)

    def max_encoded_bytes(self, numel: int) -> int:
        return 8 * numel  # widest supported dtype; the header's dtype gives the exact size


register_codec(Fp32.name, Fp32)
register_codec(Raw.name, Raw)
