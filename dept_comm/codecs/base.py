"""The codec interface, its parameters and the registry of codecs by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from dept_comm.errors import UnknownCodecError


@dataclass(frozen=True, kw_only=True, slots=True)
class CodecParams:
    """Everything a receiver needs, besides shape and dtype, to decode a payload.

    Mirrors ``dept.v1.CodecParams``; zero means "not used by this codec".
    """

    block_size: int = 0
    zstd_level: int = 0
    bits: int = 0
    keep: int = 0  # topk: values sent per block of ``block_size`` elements


class Codec(Protocol):
    """Encodes one tensor to bytes and back.

    ``encode`` takes a tensor (float codecs read values as float32) and returns the payload.
    ``decode`` rebuilds a tensor of ``shape`` and ``dtype`` (the dtype the header declares; float
    codecs compute in float32 and cast, and raise ``ManifestMismatchError`` for a dtype they do not
    support, e.g. integers); it must validate the payload length
    against ``max_encoded_bytes`` and never allocate more than the declared shape implies
    (decompression goes through a bounded reader). It raises ``dept_comm.errors.DeptError``
    subclasses on bad input, never a bare ``ValueError``/``zstd`` error.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool]  # decode(encode(x)) == x bit for bit (for float32 input)

    @property
    def params(self) -> CodecParams:
        """The resolved parameters a receiver needs to decode (sent in each tensor header)."""
        ...

    def encode(self, x: torch.Tensor) -> bytes:
        """The payload for tensor ``x`` (any shape; its values as float32 unless the codec is raw)."""
        ...

    def decode(
        self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rebuild a tensor of ``shape`` and ``dtype`` from a payload, bounded by the shape
        (a payload longer than the codec's maximum for it is refused, never decompressed past)."""
        ...

    def max_encoded_bytes(self, numel: int) -> int:
        """Upper bound on a valid payload for ``numel`` elements (used before decoding)."""
        ...


class ParameterlessCodec:
    """Shared plumbing of codecs that take no parameters (``fp32``, ``raw``, ``bf16``)."""

    def __init__(self, params: CodecParams | None = None) -> None:
        self._params = CodecParams()

    @property
    def params(self) -> CodecParams:
        return self._params


CodecFactory = Callable[[CodecParams], Codec]
_REGISTRY: dict[str, CodecFactory] = {}


def register_codec(name: str, factory: CodecFactory) -> None:
    """Register ``factory`` under ``name``; names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"codec {name!r} is already registered")
    _REGISTRY[name] = factory


def get_codec(name: str, params: CodecParams | None = None) -> Codec:
    """Build the codec registered as ``name`` with ``params`` (defaults when None).

    Without ``params``, ``name`` may be a spec with options, e.g. ``topk:k=0.02,bits=2`` (see
    ``dept_comm.codecs.spec``), as the server's ``--codec-up``/``--codec-down`` carry them.

    Raises:
        UnknownCodecError: no codec has that name.
        InvalidInputError: a spec with bad options.
    """
    if params is None and ":" in name:
        from dept_comm.codecs.spec import codec_from_spec  # the spec module imports this one

        return codec_from_spec(name)
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownCodecError(f"unknown codec {name!r}; known: {', '.join(codec_names())}") from None
    return factory(params or CodecParams())


def codec_names() -> list[str]:
    """Names of every registered codec, sorted."""
    return sorted(_REGISTRY)
