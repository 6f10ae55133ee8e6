"""``bf16-zstd``: bfloat16 with its byte planes split (all high bytes, then all low bytes), then zstd.

Decodes bit for bit to what ``bf16`` decodes. The high plane (sign and 7 exponent bits) is where
the redundancy is; the low plane (1 exponent bit, 7 mantissa bits) is close to random. zstd's
per-block entropy coding then squeezes the high plane without being confused by the low one.

Params: ``zstd_level`` (0 means the default, 1). Measured here (one thread): on 16M N(0,1)
values level 1 shrank bf16 by 1.46x at ~700 MB/s of bf16 input, level 3 by 1.41x at ~240 MB/s;
on the benchmark's pseudo-gradient level 1 gave 2.68x vs fp32, level 3 2.75x, slower.
Payload: one mode byte, then the planes, stored (mode 0) or as one zstd frame (mode 1), whichever
is smaller; an empty tensor is an empty payload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from dept_comm.codecs._common import check_float_dtype, check_level, numel_of, seal, sealed_max, unseal
from dept_comm.codecs.base import CodecParams, register_codec
from dept_comm.codecs.bf16 import bf16_bits_decode, to_bf16_bits

DEFAULT_LEVEL = 1


class Bf16Zstd:
    """bfloat16, byte planes split, zstd; lossless with respect to ``bf16``."""

    name: ClassVar[str] = "bf16-zstd"
    lossless: ClassVar[bool] = False

    def __init__(self, params: CodecParams | None = None) -> None:
        level = (params or CodecParams()).zstd_level or DEFAULT_LEVEL
        self._level = check_level(self.name, level, allow_zero=False)
        self._params = CodecParams(zstd_level=self._level)

    @property
    def params(self) -> CodecParams:
        return self._params

    def encode(self, x: torch.Tensor) -> bytes:
        pairs = to_bf16_bits(x).numpy().view(np.uint8).reshape(-1, 2)  # little-endian: [low, high]
        n = pairs.shape[0]
        buf = np.empty(1 + 2 * n, dtype=np.uint8)
        buf[1 : 1 + n] = pairs[:, 1]
        buf[1 + n :] = pairs[:, 0]
        return seal(buf, self._level)

    def decode(
        self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        check_float_dtype(self.name, dtype)
        n = numel_of(shape)
        planes = np.frombuffer(unseal(self.name, data, 2 * n, self._level), dtype=np.uint8, count=2 * n)
        pairs = np.empty((n, 2), dtype=np.uint8)
        pairs[:, 1] = planes[:n]
        pairs[:, 0] = planes[n:]
        return bf16_bits_decode(pairs.view("<u2").reshape(n), shape, dtype)

    def max_encoded_bytes(self, numel: int) -> int:
        return sealed_max(2 * numel, self._level)


register_codec(Bf16Zstd.name, Bf16Zstd)
