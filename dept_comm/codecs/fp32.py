"""``fp32``: the raw little-endian float32 bytes, the reference every ratio is quoted against."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from dept_comm.codecs.base import CodecParams, register_codec
from dept_comm.errors import SizeLimitError


class Fp32:
    """Lossless float32 codec (no compression)."""

    name: ClassVar[str] = "fp32"
    lossless: ClassVar[bool] = True

    def __init__(self, params: CodecParams | None = None) -> None:
        self._params = CodecParams()

    @property
    def params(self) -> CodecParams:
        return self._params

    def encode(self, x: torch.Tensor) -> bytes:
        arr = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        return arr.astype("<f4", copy=False).tobytes()

    def decode(self, data: bytes | memoryview, shape: Sequence[int]) -> torch.Tensor:
        numel = math.prod(shape)
        if len(data) != 4 * numel:
            raise SizeLimitError(f"fp32 payload is {len(data)} bytes, shape {list(shape)} needs {4 * numel}")
        arr = np.frombuffer(data, dtype="<f4").reshape(tuple(shape))
        return torch.from_numpy(arr.copy())

    def max_encoded_bytes(self, numel: int) -> int:
        return 4 * numel


register_codec(Fp32.name, Fp32)
