"""Codec specs as command lines write them: ``int8``, ``topk``, ``topk:k=0.02,bits=2``.

``parse_codec_spec`` turns a spec into (codec name, params); ``codec_from_spec`` builds the codec;
``codec_name`` is the registered name alone (what tensor headers carry). Only ``topk`` takes
options; an option it does not know, a value out of range or a malformed spec raises
``InvalidInputError`` (``UnknownCodecError`` for an unknown name) with the accepted form.

``topk`` options: ``k`` the fraction of each block sent, in (0, 1] (default 0.02); ``bits`` per
value sent, 2, 4 or 8 (default 2); ``block`` elements per block, 16..65536 (default 4096);
``zstd`` level, 0 (off) to 22 (default 1). ``k`` becomes ``keep = max(1, round(k * block))``.
"""

from __future__ import annotations

import math

from dept_comm.codecs import topk
from dept_comm.codecs.base import Codec, CodecParams, codec_names, get_codec
from dept_comm.errors import InvalidInputError, UnknownCodecError

_TOPK_KEYS = ("k", "bits", "block", "zstd")
_TOPK_FORM = "topk:k=FRACTION,bits=2|4|8[,block=N][,zstd=LEVEL]"


def codec_name(spec: str) -> str:
    """The codec name of ``spec`` (the part before ``:``)."""
    return spec.split(":", 1)[0].strip()


def _int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"topk option {key}={text!r} is not an integer; form: {_TOPK_FORM}") from None


def parse_codec_spec(spec: str) -> tuple[str, CodecParams | None]:
    """(name, params) for ``spec``; params None means the codec's defaults.

    Raises:
        UnknownCodecError: no codec has that name.
        InvalidInputError: options on a codec that takes none, an unknown or repeated option,
            a value that is not a number or out of range.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError("empty codec spec")
    name, sep, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in codec_names():
        raise UnknownCodecError(f"unknown codec {name!r}; known: {', '.join(codec_names())}")
    if not sep:
        return name, None
    if name != topk.TopK.name:
        raise InvalidInputError(f"codec {name!r} takes no options (got {spec!r}); only topk does")
    opts: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise InvalidInputError(f"malformed topk option {item!r} in {spec!r}; form: {_TOPK_FORM}")
        if key not in _TOPK_KEYS:
            raise InvalidInputError(f"unknown topk option {key!r}; known: {', '.join(_TOPK_KEYS)}")
        if key in opts:
            raise InvalidInputError(f"topk option {key!r} given twice in {spec!r}")
        opts[key] = value
    try:
        k = float(opts.get("k", topk.DEFAULT_KEEP / topk.DEFAULT_BLOCK))
    except ValueError:
        raise InvalidInputError(f"topk option k={opts['k']!r} is not a number; form: {_TOPK_FORM}") from None
    if not (math.isfinite(k) and 0 < k <= 1):
        raise InvalidInputError(f"topk option k={k} must be in (0, 1]")
    bits = _int("bits", opts.get("bits", str(topk.DEFAULT_BITS)))
    if bits not in topk.BITS:
        raise InvalidInputError(f"topk option bits={bits} must be one of {list(topk.BITS)}")
    block = _int("block", opts.get("block", str(topk.DEFAULT_BLOCK)))
    if not topk.MIN_BLOCK <= block <= topk.MAX_BLOCK:
        raise InvalidInputError(f"topk option block={block} must be in [{topk.MIN_BLOCK}, {topk.MAX_BLOCK}]")
    level = _int("zstd", opts.get("zstd", str(topk.DEFAULT_LEVEL)))
    keep = min(block, max(1, round(k * block)))
    params = CodecParams(block_size=block, keep=keep, bits=bits, zstd_level=level)
    get_codec(name, params)  # the codec's own checks (zstd level range)
    return name, params


def codec_from_spec(spec: str) -> Codec:
    """The codec ``spec`` names, with its options."""
    name, params = parse_codec_spec(spec)
    return get_codec(name, params)
