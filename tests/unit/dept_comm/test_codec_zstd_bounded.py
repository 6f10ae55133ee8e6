"""Bounded zstd: real decompression bombs are rejected without allocating what they ask for."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zstandard as zstd
from hypothesis import given, settings
from hypothesis import strategies as st

from dept_comm.codecs.zstd_bounded import compress, compress_bound, decompress_bounded
from dept_comm.errors import DeptError, InvalidInputError, SizeLimitError

ROOT = Path(__file__).resolve().parents[3]
MAGIC = b"\x28\xb5\x2f\xfd"
GIB = 1 << 30
MIB = 1 << 20


def _header(content_size: int | None, window_log: int = 20, dict_id: int = 0) -> bytes:
    """A zstd frame header (RFC 8878 3.1.1.1): 8-byte content size (single segment) or a window."""
    did_flag, did = (3, dict_id.to_bytes(4, "little")) if dict_id else (0, b"")
    if content_size is None:
        return MAGIC + bytes([did_flag, (window_log - 10) << 3]) + did
    return MAGIC + bytes([(3 << 6) | (1 << 5) | did_flag]) + did + content_size.to_bytes(8, "little")


def _rle_blocks(total: int, byte: int = 0) -> bytes:
    """RLE blocks of up to 128 KiB each, 4 bytes apiece, expanding to ``total`` bytes."""
    out = bytearray()
    while True:
        size = min(total, 128 << 10)
        total -= size
        out += ((size << 3) | (1 << 1) | (total == 0)).to_bytes(3, "little") + bytes([byte])
        if total == 0:
            return bytes(out)


def _streamed_zeros(total: int, *, declare: bool) -> bytes:
    """``total`` zeros streamed through libzstd in 1 MiB writes (never all in memory)."""
    buf = io.BytesIO()
    cctx = zstd.ZstdCompressor(level=1, write_content_size=declare)
    with cctx.stream_writer(buf, size=total if declare else -1, closefd=False) as w:
        chunk = bytes(MIB)
        for _ in range(total // MIB):
            w.write(chunk)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {
        # (i) 1 GiB of zeros, compressed by libzstd with its content size declared: ~32 KiB
        "declared_1gib": _streamed_zeros(GIB, declare=True),
        # (ii) a header that claims 2**60 bytes, then one small RLE block
        "claims_huge": _header(1 << 60) + _rle_blocks(1000),
        # (iii) 1 GiB streamed by libzstd without a content size: only decoding reveals the size
        "streamed_1gib": _streamed_zeros(GIB, declare=False),
        # (iii') the same by hand: 8192 RLE blocks of 128 KiB, 1 MiB window
        "rle_1gib": _header(None, window_log=20) + _rle_blocks(GIB),
        # a window far beyond any cap (1 GiB window, no content size)
        "huge_window": _header(None, window_log=30) + _rle_blocks(1000),
    }


def test_bombs_are_small_and_real(bombs: dict[str, bytes]) -> None:
    assert len(bombs["declared_1gib"]) < 64 << 10
    assert zstd.get_frame_parameters(bombs["declared_1gib"]).content_size == GIB
    assert zstd.get_frame_parameters(bombs["streamed_1gib"]).content_size == zstd.CONTENTSIZE_UNKNOWN
    # the unbounded one-shot API tries to allocate what the header claims (2**60 bytes)
    with pytest.raises(MemoryError):
        zstd.ZstdDecompressor().decompress(bombs["claims_huge"])
    # the streamed bombs really expand: count 64 MiB of output without keeping it
    for name in ("streamed_1gib", "rle_1gib"):
        with zstd.ZstdDecompressor().stream_reader(bombs[name]) as r:
            assert sum(len(r.read(MIB)) for _ in range(64)) == 64 * MIB, name


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("declared_1gib", SizeLimitError),
        ("claims_huge", SizeLimitError),
        ("streamed_1gib", SizeLimitError),
        ("rle_1gib", SizeLimitError),
        ("huge_window", SizeLimitError),
    ],
)
@pytest.mark.parametrize("cap", [0, 1000, MIB, 16 * MIB])
def test_bombs_rejected(bombs: dict[str, bytes], name: str, error: type[Exception], cap: int) -> None:
    with pytest.raises(error):
        decompress_bounded(bombs[name], cap)


_RSS_PROBE = textwrap.dedent(
    r"""
    import json, re, resource, sys
    from dept_comm.codecs.zstd_bounded import decompress_bounded
    from dept_comm.errors import SizeLimitError

    def peak() -> int:  # KiB: the high-water mark of resident memory
        try:
            return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    bombs = {p: open(p, "rb").read() for p in sys.argv[1:]}
    try:  # reset the high-water mark to the current RSS: imports peaked higher than they hold
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = peak()
    errors = {}
    for path, data in bombs.items():
        for cap in (1 << 20, 16 << 20):
            try:
                decompress_bounded(data, cap)
                errors[path] = "none"
            except SizeLimitError:
                errors.setdefault(path, "SizeLimitError")
    after = peak()
    ballast = bytearray(96 << 20)  # control: a real 96 MiB allocation does show up
    ballast[::4096] = b"x" * len(ballast[::4096])
    print(json.dumps({"before": before, "after": after, "control": peak(), "errors": errors}))
    """
)


def test_bombs_do_not_grow_peak_rss(bombs: dict[str, bytes], tmp_path: Path) -> None:
    paths = []
    for name, data in bombs.items():
        path = tmp_path / f"{name}.zst"
        path.write_bytes(data)
        paths.append(str(path))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, *paths], capture_output=True, text=True, check=True, cwd=ROOT
    )
    result = json.loads(out.stdout)
    assert set(result["errors"].values()) == {"SizeLimitError"}, result
    grew_mib = (result["after"] - result["before"]) / 1024
    assert grew_mib < 64, result  # caps of 1 and 16 MiB, bombs of 1 GiB and 2**60 bytes
    assert (result["control"] - result["after"]) / 1024 > 80, result  # the probe can see growth
    print(f"peak RSS growth over all bombs: {grew_mib:.1f} MiB")


@pytest.mark.parametrize("size", [0, 1, 1000, 128 << 10, (1 << 20) + 3])
@pytest.mark.parametrize("level", [-7, 1, 3, 19])
def test_round_trip(size: int, level: int) -> None:
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    frame = compress(memoryview(data), level)
    assert len(frame) <= compress_bound(size)
    assert zstd.get_frame_parameters(frame).content_size == size
    for view in (frame, memoryview(frame), bytearray(frame)):
        assert decompress_bounded(view, size) == data
    assert decompress_bounded(frame, size + 100) == data
    if size:
        with pytest.raises(SizeLimitError):
            decompress_bounded(frame, size - 1)


def test_compress_bound_holds_for_incompressible_input() -> None:
    for size in (0, 10, 1000, 200_000):
        data = os.urandom(size)
        assert len(compress(data, 1)) <= compress_bound(size)


def test_level_out_of_range() -> None:
    for level in (-8, 20, 22):
        with pytest.raises(InvalidInputError):
            compress(b"abc", level)


def test_frame_without_content_size_decodes_up_to_cap() -> None:
    frame = _header(None) + _rle_blocks(5000, byte=7)
    assert decompress_bounded(frame, 5000) == b"\x07" * 5000
    with pytest.raises(SizeLimitError):
        decompress_bounded(frame, 4999)


def test_malformed_frames_rejected() -> None:
    data = bytes(range(200)) * 50
    frame = compress(data, 3)
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd"
    bad = {
        "empty": b"",
        "short": frame[:3],
        "bad magic": b"\x00" + frame[1:],
        "skippable frame": skippable,
        "header only": frame[:6],
        "truncated": frame[: len(frame) // 2],
        "checksum cut": frame[:-1],
        "trailing byte": frame + b"\x00",
        "trailing magic": frame + MAGIC[:2],
        "trailing skippable": frame + skippable,
        "two frames": frame + frame,
        "corrupt body": frame[:20] + bytes([frame[20] ^ 0xFF]) + frame[21:],
        "dictionary": _header(5000, dict_id=1234) + _rle_blocks(5000),
        "lying content size": _header(100) + _rle_blocks(5000),
        "reserved block type": _header(None) + ((100 << 3) | (3 << 1) | 1).to_bytes(3, "little"),
        "no size, then garbage": _header(None) + _rle_blocks(100) + b"garbage",
        "no size, two frames": _header(None) + _rle_blocks(100) + _header(None) + _rle_blocks(100),
    }
    for name, payload in bad.items():
        with pytest.raises(InvalidInputError):
            decompress_bounded(payload, 1 << 20)
            pytest.fail(name)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_never_leaks_zstd_errors(data: st.DataObject) -> None:
    size = data.draw(st.integers(0, 5000))
    frame = bytearray(
        compress(bytes(range(256)) * (size // 256) + bytes(size % 256), data.draw(st.integers(1, 5)))
    )
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(frame) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            frame[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame[i:]
            if not frame:
                break
        else:
            frame.insert(i, data.draw(st.integers(0, 255)))
    try:
        out = decompress_bounded(bytes(frame), 5000)
    except DeptError:
        return
    assert len(out) <= 5000
