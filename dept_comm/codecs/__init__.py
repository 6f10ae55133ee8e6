"""Tensor codecs, one small module each, behind the ``Codec`` interface and a name registry.

Importing this package registers every built-in codec.
"""

from __future__ import annotations

from dept_comm.codecs import fp32  # noqa: F401  (registers)
from dept_comm.codecs.base import Codec, CodecParams, codec_names, get_codec, register_codec

__all__ = ["Codec", "CodecParams", "codec_names", "get_codec", "register_codec"]
