"""zstd with a hard cap on decompressed size: frame headers are checked, never trusted.

``zstandard``'s one-shot ``decompress`` allocates whatever the frame header declares (a 32 KiB
frame asked this machine for 1 GiB), so ``decompress_bounded`` first reads the header with
``get_frame_parameters`` and rejects a declared content size over the cap or a window over
``_window_cap(cap)``. Then:

* a frame that declares its size (every frame ``compress`` writes) is decoded into a buffer of
  exactly that size, already checked against the cap; producing more is a zstd error, and this
  path also rejects truncation and any byte after the frame;
* a frame that declares no size is decoded through a ``ZstdDecompressor(max_window_size=...)``
  ``stream_reader`` that reads at most ``cap + 1`` bytes, so a frame that expands forever stops
  one byte past the cap and raises ``SizeLimitError``.

Peak memory is therefore about ``cap`` plus (streaming only) a window of at most
``_window_cap(cap)``. Every ``zstd.ZstdError`` becomes ``InvalidInputError``. One standard zstd
frame is accepted: skippable frames, dictionaries, trailing bytes and second frames are rejected
(for a frame without a declared size, a second frame or bytes that do not parse as one). Frames
written by ``compress`` carry a content checksum, so corruption is detected too.
"""

from __future__ import annotations

import threading

import zstandard as zstd

from dept_comm.errors import InvalidInputError, SizeLimitError

__all__ = ["MAX_LEVEL", "MIN_LEVEL", "compress", "compress_bound", "decompress_bounded"]

MIN_LEVEL = -7  # zstd "fast" levels go lower, but below this they barely compress
MAX_LEVEL = 19  # levels 20-22 ("ultra") want windows far beyond what a tensor needs

_MAGIC = b"\x28\xb5\x2f\xfd"  # little-endian 0xFD2FB528, a standard zstd frame
_MIN_WINDOW = 1 << 20  # small outputs still get a 1 MiB window (zstd's own floor is 1 KiB)
_MAX_WINDOW = 1 << 31  # libzstd's largest windowLogMax on 64-bit hosts

_CACHED_LEVELS = 9
_local = threading.local()  # zstd contexts are not thread-safe; keep one set per thread


def _window_cap(cap: int) -> int:
    """Largest window a frame decoding to at most ``cap`` bytes needs: ``cap`` rounded up to a
    power of two (zstd windows are powers of two, plus eighths), at least 1 MiB, at most 2 GiB."""
    return min(_MAX_WINDOW, max(_MIN_WINDOW, 1 << max(0, cap - 1).bit_length()))


def _compressor(level: int) -> zstd.ZstdCompressor:
    if level > _CACHED_LEVELS:  # high levels hold large tables: build, use, free
        return zstd.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    cache: dict[int, zstd.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstd.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx


def _decompressor(window_cap: int) -> zstd.ZstdDecompressor:
    cache: dict[int, zstd.ZstdDecompressor] | None = getattr(_local, "dctx", None)
    if cache is None:
        cache = _local.dctx = {}
    dctx = cache.get(window_cap)
    if dctx is None:
        dctx = cache[window_cap] = zstd.ZstdDecompressor(max_window_size=window_cap)
    return dctx


def compress_bound(size: int) -> int:
    """Most bytes ``compress`` can return for ``size`` input bytes (libzstd's ZSTD_COMPRESSBOUND
    plus the 4-byte checksum and a maximal 18-byte frame header)."""
    margin = ((128 << 10) - size) >> 11 if size < (128 << 10) else 0
    return size + (size >> 8) + margin + 4 + 18


def compress(data: bytes | bytearray | memoryview, level: int) -> bytes:
    """One zstd frame of ``data`` with its content size and a checksum in the header.

    Raises:
        InvalidInputError: ``level`` is outside ``[MIN_LEVEL, MAX_LEVEL]``.
    """
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise InvalidInputError(f"zstd level {level} is outside [{MIN_LEVEL}, {MAX_LEVEL}]")
    try:
        return _compressor(level).compress(data)
    except zstd.ZstdError as e:  # pragma: no cover - compressing never fails on valid input
        raise InvalidInputError(f"zstd compression failed: {e}") from None


def decompress_bounded(data: bytes | bytearray | memoryview, max_output_bytes: int) -> bytes:
    """Decompress one zstd frame that must expand to at most ``max_output_bytes`` bytes.

    Never allocates much more than ``max_output_bytes`` (plus a window no larger than that
    rounded up to a power of two, and at least 1 MiB), whatever the frame header says.

    Raises:
        SizeLimitError: the frame declares, needs (window) or produces more than the cap.
        InvalidInputError: not exactly one well-formed zstd frame (corrupt, truncated, trailing
            bytes, a dictionary or a skippable frame).
    """
    if max_output_bytes < 0:
        raise ValueError("max_output_bytes must be >= 0")
    if len(data) < 4 or bytes(data[:4]) != _MAGIC:
        raise InvalidInputError("not a zstd frame (bad magic number)")
    try:
        fp = zstd.get_frame_parameters(data)
    except zstd.ZstdError as e:
        raise InvalidInputError(f"bad zstd frame header: {e}") from None
    if fp.dict_id:
        raise InvalidInputError(f"zstd frame needs dictionary {fp.dict_id}; none are used")
    declared = fp.content_size
    known = declared != zstd.CONTENTSIZE_UNKNOWN
    if known and declared > max_output_bytes:
        raise SizeLimitError(f"zstd frame declares {declared} bytes; the cap is {max_output_bytes}")
    window_cap = _window_cap(max_output_bytes)
    if fp.window_size > window_cap:
        raise SizeLimitError(f"zstd frame wants a {fp.window_size}-byte window; the cap is {window_cap}")
    try:
        if known and declared > 0:
            # The output buffer is exactly the declared size, checked against the cap above; a
            # frame that then produces more fails ("destination buffer too small"), and this
            # path also rejects truncation (checksum included) and any byte after the frame.
            out = _decompressor(window_cap).decompress(data, allow_extra_data=False)
        else:
            # No (or a zero) declared size: read at most cap + 1 (or 1) bytes. With
            # read_across_frames=False, read() stops at the end of the first frame and the next
            # read() starts a second one, so one more byte tells whether anything follows.
            # A fresh context: its window buffer (up to window_cap) is freed afterwards.
            stream = zstd.ZstdDecompressor(max_window_size=window_cap)
            limit = 0 if known else max_output_bytes
            with stream.stream_reader(data, read_across_frames=False, closefd=False) as reader:
                out = reader.read(limit + 1)
                if len(out) > max_output_bytes:
                    raise SizeLimitError(f"zstd frame expands past the cap of {max_output_bytes} bytes")
                if reader.read(1):
                    raise InvalidInputError("zstd payload holds more than one frame")
    except zstd.ZstdError as e:
        raise InvalidInputError(f"corrupt zstd data: {e}") from None
    if known and len(out) != declared:
        raise InvalidInputError(f"truncated zstd frame: {len(out)} of {declared} declared bytes")
    return out
