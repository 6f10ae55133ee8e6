"""Blockwise absmax quantisation, shared by ``int8`` and ``int4``.

The flat tensor is cut into blocks of ``block_size`` elements (the last may be shorter). Each
block gets one scale ``s >= absmax / qmax`` and its elements become ``q = round(x / s)`` (to
nearest, ties to even) in ``[-qmax, qmax]``; decoding is ``q * s``.

Scales are stored as bfloat16 bit patterns, *rounded up* from ``absmax / qmax`` so that ``|q|``
never exceeds ``qmax`` and no clamping pass is needed: bfloat16 has float32's exponent range
(no overflow, no fp16 underflow for tiny pseudo-gradients) and rounding up costs at most 2**-7 of
the step. A scale is at least 2**-126 (float32's smallest normal), so ``1 / s`` is finite and an
all-zero block needs no special case. Per element, for finite input::

    |decode(x) - x| <= absmax_block / qmax / 2 * (1 + 2**-7) + 2**-127   (plus float rounding)

A block holding NaN or Inf gets a NaN scale and zero values, so it decodes to NaN (the stream
layer rejects non-finite tensors) instead of garbage; a received NaN or Inf scale likewise
decodes to NaN/Inf, never to finite garbage, and nothing is allocated beyond the output.

Payload body: ``nblocks`` scales (2 bytes each, little-endian), then the values (int8: one byte
each; int4: two per byte, even element in the low nibble, two's complement nibbles). With
``zstd_level`` 0 the body is the payload; otherwise ``_common.seal`` adds a mode byte and
compresses where it pays.

Params: ``block_size`` (even, 16..65536; 0 means the default), ``bits`` (0 or the codec's own),
``zstd_level`` (0: no zstd stage). ``CodecParams()`` with every field zero means the codec's
defaults, zstd included; any other params are taken literally. ``params`` always reports the
resolved values, so a receiver rebuilding the codec from a header gets exactly the sender's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from dept_comm.codecs._common import (
    CHUNK,
    bf16_bits_to_float32,
    check_float_dtype,
    check_level,
    finish,
    float32_flat,
    numel_of,
    seal,
    sealed_max,
    unseal,
)
from dept_comm.codecs.base import CodecParams
from dept_comm.errors import InvalidInputError

MIN_BLOCK = 16
MAX_BLOCK = 1 << 16
MIN_SCALE = 2.0**-126
_NAN_BITS = 0x7FC00000
_ROUND_UP = 0xFFFF
_HIGH_HALF = -65536  # 0xFFFF0000 as int32

# int4 decode table: byte -> its two sign-extended nibbles as int8 (low nibble first).
_NIBBLES = np.arange(16, dtype=np.int16)
_NIBBLES = np.where(_NIBBLES >= 8, _NIBBLES - 16, _NIBBLES).astype(np.int8)
_INT4_TABLE = (
    np.stack([np.tile(_NIBBLES, 16), np.repeat(_NIBBLES, 16)], axis=1).copy().view("<u2").reshape(256)
)


def _scales(absmax: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(bfloat16 scale bits as uint16, float32 reciprocal scales, whether every block is finite)."""
    bits = (absmax / np.float32(qmax)).view(np.int32)
    finite = bool(np.isfinite(absmax).all())
    if finite:
        bits += _ROUND_UP  # absmax / qmax < 2**128 / 127: no int32 overflow
        bits &= _HIGH_HALF
    else:
        bits = np.where(np.isfinite(absmax), (bits + _ROUND_UP) & _HIGH_HALF, np.int32(_NAN_BITS))
    scale = bits.view(np.float32)
    np.maximum(scale, np.float32(MIN_SCALE), out=scale)  # NaN stays NaN; -0.0 and zero become 2**-126
    inv = np.float32(1.0) / scale
    if not finite:
        inv[~np.isfinite(scale)] = 0.0
    return (scale.view(np.uint32) >> 16).astype("<u2"), inv, finite


class AbsmaxCodec:
    """Base of the blockwise absmax quantisers; subclasses set the class attributes below and
    implement ``_store`` (quantised rows -> value bytes) and ``_load`` (value bytes -> int8)."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = False
    bits: ClassVar[int]
    qmax: ClassVar[int]
    default_block: ClassVar[int]
    default_level: ClassVar[int]

    def __init__(self, params: CodecParams | None = None) -> None:
        p = params or CodecParams()
        if p == CodecParams():
            block, level = self.default_block, self.default_level
        else:
            block, level = p.block_size or self.default_block, p.zstd_level
        if p.bits not in (0, self.bits):
            raise InvalidInputError(f"{self.name}: bits must be 0 or {self.bits}, got {p.bits}")
        if not (isinstance(block, int) and MIN_BLOCK <= block <= MAX_BLOCK and block % 2 == 0):
            raise InvalidInputError(
                f"{self.name}: block_size {block} must be even, in [{MIN_BLOCK}, {MAX_BLOCK}]"
            )
        self._block = block
        self._level = check_level(self.name, level, allow_zero=True)
        self._params = CodecParams(block_size=block, zstd_level=self._level, bits=self.bits)

    @property
    def params(self) -> CodecParams:
        return self._params

    # -- layout ------------------------------------------------------------------------------

    @staticmethod
    def _value_bytes(numel: int) -> int:
        raise NotImplementedError

    def _body_bytes(self, numel: int) -> int:
        nblocks = -(-numel // self._block)
        return 2 * nblocks + self._value_bytes(numel)

    def max_encoded_bytes(self, numel: int) -> int:
        return sealed_max(self._body_bytes(numel), self._level)

    # -- encode ------------------------------------------------------------------------------

    def _store(self, rows: np.ndarray, values: np.ndarray, start: int) -> None:
        """Write rounded rows (float32, integral, flat order from element ``start``) into the
        value bytes ``values`` (uint8)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> bytes:
        xn = float32_flat(x).numpy()
        n = xn.size
        if n == 0:
            return b""
        blk = self._block
        full, tail = divmod(n, blk)
        nblocks = full + (tail > 0)
        main = xn[: full * blk].reshape(full, blk)
        absmax = np.empty(nblocks, dtype=np.float32)
        if full:
            np.maximum(main.max(axis=1), np.negative(main.min(axis=1)), out=absmax[:full])
        if tail:
            rest = xn[full * blk :]
            absmax[full] = max(rest.max(), -rest.min()) if np.isfinite(rest).all() else np.nan
        scale_bits, inv, finite = _scales(absmax, self.qmax)

        buf = np.empty(1 + self._body_bytes(n), dtype=np.uint8)
        buf[1 : 1 + 2 * nblocks] = scale_bits.view(np.uint8)
        values = buf[1 + 2 * nblocks :]
        with np.errstate(invalid="ignore"):  # only non-finite blocks (inv = 0) can hit inf * 0
            rows_per_chunk = max(1, CHUNK // blk)
            scratch = np.empty((min(full, rows_per_chunk), blk), dtype=np.float32)
            for i in range(0, full, rows_per_chunk):
                j = min(full, i + rows_per_chunk)
                y = scratch[: j - i]
                np.multiply(main[i:j], inv[i:j, None], out=y)
                np.rint(y, out=y)
                if not finite:
                    np.nan_to_num(y, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
                self._store(y, values, i * blk)
            if tail:
                y = xn[full * blk :] * inv[full]
                np.rint(y, out=y)
                if not finite:
                    np.nan_to_num(y, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
                self._store(y, values, full * blk)
        return seal(buf, self._level)

    # -- decode ------------------------------------------------------------------------------

    def _load(self, body: bytes | memoryview, offset: int, start: int, count: int) -> np.ndarray:
        """``count`` quantised values (int8) from element ``start`` (even) of the value bytes
        that begin at byte ``offset`` of ``body``."""
        raise NotImplementedError

    def decode(
        self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        check_float_dtype(self.name, dtype)
        n = numel_of(shape)
        body = unseal(self.name, data, self._body_bytes(n), self._level)
        out = torch.empty(n, dtype=torch.float32)
        if n:
            blk = self._block
            full, tail = divmod(n, blk)
            nblocks = full + (tail > 0)
            scales = bf16_bits_to_float32(np.frombuffer(body, dtype="<u2", count=nblocks))
            o = out.numpy()
            rows_per_chunk = max(1, CHUNK // blk)
            with np.errstate(invalid="ignore", over="ignore"):  # a hostile NaN/Inf scale gives NaN/Inf
                for i in range(0, full, rows_per_chunk):
                    j = min(full, i + rows_per_chunk)
                    q = self._load(body, 2 * nblocks, i * blk, (j - i) * blk).reshape(j - i, blk)
                    np.multiply(q, scales[i:j, None], out=o[i * blk : j * blk].reshape(j - i, blk))
                if tail:
                    np.multiply(
                        self._load(body, 2 * nblocks, full * blk, tail), scales[full], out=o[full * blk :]
                    )
        return finish(out, shape, dtype)


def int4_pack(q: np.ndarray, dest: np.ndarray) -> None:
    """Pack int8 values ``q`` (even count, each in [-8, 7]) two per byte into ``dest`` (uint8)."""
    pairs = q.view(np.uint8).reshape(-1, 2)
    np.left_shift(pairs[:, 1], 4, out=dest)  # uint8: the high nibble of the byte drops out
    dest |= pairs[:, 0] & 15


def int4_unpack(packed: np.ndarray, numel: int) -> np.ndarray:
    """Two's-complement nibbles (low first) of ``packed`` (uint8) as ``numel`` int8 values."""
    return np.take(_INT4_TABLE, packed).view(np.int8)[:numel]
