"""Helpers shared by the float codecs: input conversion, shape/dtype checks, the zstd stage."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dept_comm.codecs.zstd_bounded import MAX_LEVEL, MIN_LEVEL, compress, decompress_bounded
from dept_comm.errors import InvalidInputError, ManifestMismatchError, SizeLimitError

# Elements handled per step on hot paths: temporaries of this size stay in cache and are reused,
# which here is several times faster than one whole-tensor temporary (fresh pages fault in).
CHUNK = 1 << 18

_MODE_RAW = 0
_MODE_ZSTD = 1


def numel_of(shape: Sequence[int]) -> int:
    """Elements of ``shape``; a negative or non-integer dimension is malformed input."""
    dims = list(shape)
    for d in dims:
        if not isinstance(d, int | np.integer) or isinstance(d, bool) or d < 0:
            raise InvalidInputError(f"bad shape {dims}: dimensions must be integers >= 0")
    return math.prod(dims)


def check_float_dtype(codec: str, dtype: torch.dtype) -> None:
    """Float codecs decode to floating dtypes only."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ManifestMismatchError(f"{codec} codec cannot decode dtype {dtype}")


def float32_flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous 1-D float32 CPU tensor (no copy when it already is one)."""
    t = x.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.dtype != torch.float32:
        if t.is_complex():
            raise ManifestMismatchError(f"float codecs cannot encode dtype {t.dtype}")
        t = t.to(torch.float32)
    return t.contiguous().view(-1)


def finish(out: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Reshape a decoded float32 tensor and cast it to the declared floating ``dtype``."""
    out = out.view(tuple(shape))
    return out if dtype == torch.float32 else out.to(dtype)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32: exact, a shift into the high half."""
    out: np.ndarray = np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    return out


def check_level(codec: str, level: int, *, allow_zero: bool) -> int:
    if not isinstance(level, int) or not (MIN_LEVEL <= level <= MAX_LEVEL) or (level == 0 and not allow_zero):
        lo = "0 (off) or " if allow_zero else ""
        raise InvalidInputError(
            f"{codec}: zstd_level {level} must be {lo}in [{MIN_LEVEL}, {MAX_LEVEL}] and not 0"
        )
    return level


def sealed_max(body_len: int, level: int) -> int:
    """Largest payload ``seal`` returns for a body of ``body_len`` bytes."""
    if body_len == 0:
        return 0
    return body_len + (1 if level else 0)


def seal(buf: np.ndarray, level: int) -> bytes:
    """The payload for ``buf[1:]`` (the body; ``buf[0]`` is scratch for the mode byte).

    Level 0: the body itself. Otherwise one mode byte, then the body (mode 0) or a zstd frame of
    it (mode 1) where that saves at least 1/32 of the body (and 16 bytes): zstd where it pays, so
    an incompressible body costs one byte and decodes at memcpy speed.
    """
    body = buf[1:]
    if body.size == 0:
        return b""
    if level == 0:
        return body.tobytes()
    frame = compress(body.data, level)
    if len(frame) <= body.size - max(16, body.size >> 5):
        return bytes((_MODE_ZSTD,)) + frame
    buf[0] = _MODE_RAW
    return buf.tobytes()


def unseal(codec: str, data: bytes | memoryview, body_len: int, level: int) -> bytes | memoryview:
    """The body of a payload ``seal`` wrote, after checking its length against ``body_len``.

    Raises:
        SizeLimitError: the payload (or what it decompresses to) is longer than the body can be,
            or a stored body has the wrong length.
        InvalidInputError: an unknown mode byte, corrupt zstd, or a body that decompresses short.
    """
    n = len(data)
    if body_len == 0 or level == 0:
        if n != body_len:
            raise SizeLimitError(f"{codec} payload is {n} bytes; expected {body_len}")
        return data
    if n > body_len + 1:
        raise SizeLimitError(f"{codec} payload is {n} bytes; at most {body_len + 1} expected")
    if n == 0:
        raise SizeLimitError(f"{codec} payload is empty; expected up to {body_len + 1} bytes")
    view = memoryview(data)
    mode = view[0]
    if mode == _MODE_RAW:
        if n != body_len + 1:
            raise SizeLimitError(f"{codec} stored payload is {n} bytes; expected {body_len + 1}")
        return view[1:]
    if mode != _MODE_ZSTD:
        raise InvalidInputError(f"{codec} payload has unknown mode byte {mode}")
    body = decompress_bounded(view[1:], body_len)
    if len(body) != body_len:
        raise InvalidInputError(f"{codec} payload decompresses to {len(body)} bytes; expected {body_len}")
    return body
