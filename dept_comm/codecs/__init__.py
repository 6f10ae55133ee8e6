"""Tensor codecs, one small module each, behind the ``Codec`` interface and a name registry.

Importing this package registers every built-in codec.
"""

from __future__ import annotations

from dept_comm.codecs import bf16, bf16_zstd, fp32, int4, int8, topk  # noqa: F401  (registers)
from dept_comm.codecs.base import Codec, CodecParams, codec_names, get_codec, register_codec
from dept_comm.codecs.feedback import ErrorFeedback
from dept_comm.codecs.spec import codec_from_spec, codec_name, parse_codec_spec

__all__ = [
    "Codec",
    "CodecParams",
    "ErrorFeedback",
    "codec_from_spec",
    "codec_name",
    "codec_names",
    "get_codec",
    "parse_codec_spec",
    "register_codec",
]
