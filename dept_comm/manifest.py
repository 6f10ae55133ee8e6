"""Receiver limits and the check of one tensor header against them and an optional manifest."""

from __future__ import annotations

import math
from collections.abc import Set
from dataclasses import dataclass

from dept_comm.codecs import Codec, CodecParams, get_codec
from dept_comm.digest import Group, Manifest, TensorSpec, dtype_from_pb
from dept_comm.errors import ManifestMismatchError, SizeLimitError, StreamOrderError, UnknownCodecError
from dept_comm.pb import tensor_pb2 as pb

__all__ = [
    "DEFAULT_LIMITS",
    "DIGEST_BYTES",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "ReceiveLimits",
    "check_header",
]

MIN_CHUNK_BYTES = 1 << 10
MAX_CHUNK_BYTES = 2 << 20
DIGEST_BYTES = 16  # xxh3-128


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiveLimits:
    """Caps a receiver enforces before it stores anything."""

    max_tensors: int = 100_000
    max_total_raw_bytes: int = 16 << 30
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    allowed_codecs: frozenset[str] | None = None  # None: every registered codec
    require_finite: bool = True

    def __post_init__(self) -> None:
        if self.max_tensors < 0 or self.max_total_raw_bytes < 0:
            raise ValueError(f"limits must be >= 0, got {self.max_tensors}, {self.max_total_raw_bytes}")
        if not 1 <= self.max_chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"max_chunk_bytes must be in [1, 2 MiB], got {self.max_chunk_bytes}")


DEFAULT_LIMITS = ReceiveLimits()


def check_header(
    h: pb.TensorHeader,
    *,
    manifest: Manifest | None,
    limits: ReceiveLimits,
    seen_names: Set[str],
    raw_bytes_so_far: int,
) -> tuple[TensorSpec, Codec]:
    """Validate one tensor header; returns its spec and the codec that decodes its payload.

    Args:
        h: the header from a tensor's first chunk.
        manifest: when given, the name must be in it with the same shape, dtype and group.
        limits: codec allow-list, tensor count, total raw bytes, chunk size.
        seen_names: names already in the stream (a name may appear once).
        raw_bytes_so_far: fp32 reference bytes of the tensors already accepted.

    Raises:
        ManifestMismatchError: no name, repeated name, bad shape/dtype/group, not as in the manifest.
        UnknownCodecError: codec not allowed, not registered, or refusing its params.
        SizeLimitError: too many tensors, raw bytes over the cap, encoded bytes over the codec's cap,
            raw_bytes inconsistent with the shape.
        StreamOrderError: num_chunks impossible for encoded_bytes, or a malformed digest.
    """
    if not h.name:
        raise ManifestMismatchError("tensor header without a name")
    if h.name in seen_names:
        raise ManifestMismatchError(f"tensor {h.name!r} appears twice in the stream")
    if len(seen_names) >= limits.max_tensors:
        raise SizeLimitError(f"tensor {h.name!r} is past max_tensors={limits.max_tensors}")
    if any(d < 0 for d in h.shape):
        raise ManifestMismatchError(f"tensor {h.name!r} has a negative dimension in shape {list(h.shape)}")
    try:
        group = Group(h.group)
    except ValueError:
        raise ManifestMismatchError(f"tensor {h.name!r} has unknown group {h.group}") from None
    spec = TensorSpec(h.name, tuple(h.shape), dtype_from_pb(h.dtype), group)
    if manifest is not None:
        want = manifest.get(h.name)
        if want is None:
            raise ManifestMismatchError(f"tensor {h.name!r} is not in the manifest")
        if want != spec:
            raise ManifestMismatchError(f"tensor {h.name!r}: got {spec}, manifest expects {want}")
    if limits.allowed_codecs is not None and h.codec not in limits.allowed_codecs:
        allowed = sorted(limits.allowed_codecs)
        raise UnknownCodecError(f"codec {h.codec!r} of {h.name!r} not allowed; allowed: {allowed}")
    p = h.codec_params
    params = CodecParams(block_size=p.block_size, zstd_level=p.zstd_level, bits=p.bits)
    try:
        codec = get_codec(h.codec, params)
    except ValueError as err:  # a factory refusing its params
        raise UnknownCodecError(f"codec {h.codec!r} refuses params {params}: {err}") from err
    numel = spec.numel
    if h.raw_bytes != numel * 4:
        raise SizeLimitError(f"tensor {h.name!r} declares raw_bytes={h.raw_bytes}, shape implies {numel * 4}")
    if raw_bytes_so_far + numel * 4 > limits.max_total_raw_bytes:
        raise SizeLimitError(
            f"tensor {h.name!r} brings raw bytes to {raw_bytes_so_far + numel * 4}, "
            f"limit max_total_raw_bytes={limits.max_total_raw_bytes}"
        )
    cap = codec.max_encoded_bytes(numel)
    if h.encoded_bytes > cap:
        raise SizeLimitError(
            f"tensor {h.name!r} encoded_bytes={h.encoded_bytes} over codec {h.codec!r} cap {cap}"
        )
    lo = max(1, math.ceil(h.encoded_bytes / limits.max_chunk_bytes))
    hi = max(1, math.ceil(h.encoded_bytes / MIN_CHUNK_BYTES))
    if not lo <= h.num_chunks <= hi:
        raise StreamOrderError(
            f"tensor {h.name!r} num_chunks={h.num_chunks} not in [{lo}, {hi}] for encoded_bytes={h.encoded_bytes}"
        )
    if len(h.digest) != DIGEST_BYTES:
        raise StreamOrderError(f"tensor {h.name!r} digest is {len(h.digest)} bytes, want {DIGEST_BYTES}")
    return spec, codec
