"""One tensor on the wire: its payload and header, the receiver's limits and checks, its staging buffer."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import torch
import xxhash

from dept_comm.codecs import Codec, CodecParams, get_codec
from dept_comm.codecs._absmax import AbsmaxCodec
from dept_comm.codecs.gpu import decode_on_device
from dept_comm.digest import Group, Manifest, TensorSpec, check_finite, dtype_from_pb, dtype_to_pb
from dept_comm.errors import (
    CommitMismatchError,
    ConflictError,
    ManifestMismatchError,
    SizeLimitError,
    StreamOrderError,
    UnknownCodecError,
)
from dept_comm.frames import Buffer, chunk_checksum
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.staging import Backing, MemoryBacking

__all__ = [
    "DEFAULT_LIMITS",
    "DIGEST_BYTES",
    "Encoder",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "ReceiveLimits",
    "check_header",
]

MIN_CHUNK_BYTES = 1 << 10
MAX_CHUNK_BYTES = 2 << 20
DIGEST_BYTES = 16  # xxh3-128

# Codecs whose payload is the tensor's own little-endian bytes for these dtypes: the sender
# slices the tensor's memory, the receiver stages chunks straight into the output tensor.
SAME_BYTES: dict[str, frozenset[torch.dtype]] = {
    "fp32": frozenset({torch.float32}),
    "raw": frozenset({torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64}),
}


def is_same_bytes(codec_name: str, dtype: torch.dtype) -> bool:
    """Whether ``codec_name`` encodes ``dtype`` as the tensor's own bytes on this machine."""
    return sys.byteorder == "little" and dtype in SAME_BYTES.get(codec_name, ())


Encoder = Callable[[str, torch.Tensor, Codec], bytes]


def is_codec(obj: Any) -> TypeGuard[Codec]:
    """A codec instance, as opposed to a function choosing one per tensor."""
    return hasattr(obj, "encode") and hasattr(obj, "max_encoded_bytes")


def tensor_payload(name: str, x: torch.Tensor, codec: Codec, encoder: Encoder | None) -> bytes | memoryview:
    """The encoded bytes of ``x``: ``encoder`` when given, else the codec's; for same-bytes codecs
    on contiguous CPU tensors a view of the tensor's own memory (no copy)."""
    if encoder is not None:
        p = encoder(name, x, codec)
    elif x.device.type == "cpu" and x.is_contiguous() and is_same_bytes(codec.name, x.dtype):
        return x.detach().reshape(-1).view(torch.uint8).numpy().data
    else:
        p = codec.encode(x)
    return p


def chunk_checksums(payload: Buffer, chunk_bytes: int) -> list[int]:
    """The checksum of every ``chunk_bytes`` piece of ``payload`` (one, empty, for an empty payload)."""
    view = memoryview(payload).cast("B")
    n = max(1, -(-len(view) // chunk_bytes))
    return [chunk_checksum(view[k * chunk_bytes : (k + 1) * chunk_bytes]) for k in range(n)]


def payload_digest(checksums: Sequence[int] | np.ndarray) -> bytes:
    """A payload's digest: xxh3-128 over its chunk checksums, 8 bytes little-endian each, in order.

    Each chunk's bytes are hashed once (its checksum, checked on arrival); the digest ties the
    chunks together, and the commit digest ties the tensors together.
    """
    return xxhash.xxh3_128_digest(np.asarray(checksums, dtype="<u8").tobytes())


def build_header(
    name: str,
    x: torch.Tensor,
    codec: Codec,
    payload: bytes | memoryview,
    group: Group,
    checksums: Sequence[int],
) -> pb.TensorHeader:
    """The header of ``x`` sent as ``payload`` in ``len(checksums)`` chunks with these checksums.

    The wire dtype is the one the receiver rebuilds: float32 for float codecs, the tensor's own
    dtype for ``raw`` and for integer tensors.

    Raises:
        ManifestMismatchError: a dtype with no wire representation.
    """
    keep = codec.name == "raw" or not x.dtype.is_floating_point
    p = codec.params
    return pb.TensorHeader(
        name=name,
        shape=list(x.shape),
        dtype=dtype_to_pb(x.dtype if keep else torch.float32),
        codec=codec.name,
        codec_params=pb.CodecParams(
            block_size=p.block_size, zstd_level=p.zstd_level, bits=p.bits, keep=p.keep
        ),
        raw_bytes=x.numel() * 4,
        encoded_bytes=len(payload),
        group=pb.TensorGroup.ValueType(group),
        num_chunks=len(checksums),
        digest=payload_digest(checksums),
    )


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
# Pulls from the coordinator: the stream is checked (checksums, digests, sizes), and the body digest
# after applying it proves equality with the server's copy, whose inputs were all checked finite.
PULL_LIMITS = ReceiveLimits(require_finite=False)


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
    params = CodecParams(block_size=p.block_size, zstd_level=p.zstd_level, bits=p.bits, keep=p.keep)
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


class TensorStage:
    """One tensor's header facts and its encoded bytes, in a single buffer filled chunk by chunk.

    Every chunk but the last has the size of the first (``step``), so chunk ``k`` lives at
    ``k * step`` and chunks may arrive in any order. For same-bytes codecs the buffer is the
    output tensor itself, so decoding copies nothing. Pages are touched only as data arrives.
    """

    __slots__ = (
        "spec",
        "codec",
        "encoded_bytes",
        "num_chunks",
        "digest",
        "step",
        "held",
        "_out",
        "_buf",
        "_sums",
    )

    def __init__(
        self,
        spec: TensorSpec,
        codec: Codec,
        h: pb.TensorHeader,
        first_chunk_bytes: int,
        allocate: Callable[[int], Backing] | None = None,
    ) -> None:
        """Check the chunk geometry and allocate the buffer (``allocate``: where, default memory).

        Raises:
            StreamOrderError: chunk sizes that cannot cut ``encoded_bytes`` into ``num_chunks``.
            SizeLimitError: a same-bytes payload whose size is not the tensor's.
        """
        n, size = h.num_chunks, h.encoded_bytes
        step = size if n == 1 else first_chunk_bytes
        if n == 1 and first_chunk_bytes != size:
            raise StreamOrderError(
                f"tensor {h.name!r} is one chunk of {first_chunk_bytes} bytes, header says {size}"
            )
        if n > 1 and not (step >= MIN_CHUNK_BYTES and (n - 1) * step < size <= n * step):
            raise StreamOrderError(
                f"tensor {h.name!r}: {n} chunks of {step} bytes cannot hold encoded_bytes={size}"
                f" (chunks must be >= {MIN_CHUNK_BYTES} bytes, all but the last of equal size)"
            )
        self.spec, self.codec = spec, codec
        self.encoded_bytes, self.num_chunks, self.digest, self.step = size, n, h.digest, step
        self.held: set[int] = set()
        self._sums = np.zeros(n, dtype="<u8")  # chunk checksums, checked on arrival, for the digest
        self._out: torch.Tensor | None = None
        self._buf: Backing | None = None
        same = is_same_bytes(codec.name, spec.dtype)
        if same:
            need = math.prod(spec.shape) * torch.empty(0, dtype=spec.dtype).element_size()
            if need != size:
                raise SizeLimitError(
                    f"{codec.name} payload of {spec.name!r} is {size} bytes, shape needs {need}"
                )
        backing = allocate(size) if allocate is not None else MemoryBacking(size)
        if same and isinstance(backing, MemoryBacking) and backing.tensor is not None:
            self._out = backing.tensor.view(spec.dtype).reshape(spec.shape)
        self._buf = backing

    def chunk_size(self, chunk_idx: int) -> int:
        return self.step if chunk_idx < self.num_chunks - 1 else self.encoded_bytes - self.step * chunk_idx

    def check(self, chunk_idx: int, num_bytes: int, seq: int) -> None:
        """Raise unless chunk ``chunk_idx`` of ``num_bytes`` bytes may be stored."""
        if chunk_idx >= self.num_chunks:
            raise StreamOrderError(
                f"chunk seq={seq} chunk_idx={chunk_idx} past num_chunks={self.num_chunks} of {self.spec.name!r}"
            )
        if chunk_idx in self.held:
            raise ConflictError(
                f"chunk seq={seq}: {self.spec.name!r} chunk {chunk_idx} already came as another seq"
            )
        want = self.chunk_size(chunk_idx)
        if num_bytes != want:
            raise SizeLimitError(
                f"chunk seq={seq} of {self.spec.name!r} has {num_bytes} bytes, expected {want}"
            )

    def _backing(self) -> Backing:
        if self._buf is None:
            raise StreamOrderError(f"tensor {self.spec.name!r} was already decoded and released")
        return self._buf

    def store(self, chunk_idx: int, data: bytes | memoryview, checksum: int) -> None:
        """Stage chunk ``chunk_idx`` (already checked: ``check`` and ``checksum == chunk_checksum(data)``)."""
        self._backing().write(chunk_idx * self.step, data)
        self._sums[chunk_idx] = checksum
        self.held.add(chunk_idx)

    @property
    def in_memory(self) -> bool:
        """Whether the staged bytes are in memory (not spilled to a file)."""
        return isinstance(self._buf, MemoryBacking)

    def view(self, chunk_idx: int) -> memoryview:
        """The stored bytes of chunk ``chunk_idx``."""
        return self._backing().read(chunk_idx * self.step, self.chunk_size(chunk_idx))

    def release(self) -> None:
        """Drop the staged bytes (memory back to its budget)."""
        buf, self._buf, self._out = self._buf, None, None
        if buf is not None:
            buf.release()

    def verify_digest(self) -> None:
        """Raise unless every chunk is held and the payload hashes to the header's digest."""
        if len(self.held) != self.num_chunks or payload_digest(self._sums) != self.digest:
            raise CommitMismatchError(
                f"tensor {self.spec.name!r}: payload of {len(self.held)}/{self.num_chunks} chunks"
                " does not hash to its header's digest"
            )

    def decode(
        self, require_finite: bool, device: torch.device | None = None, *, release: bool = True
    ) -> torch.Tensor:
        """Verify the payload digest, decode, check the result, and (``release``) release the buffer.

        With ``release=False`` the staged bytes stay, so the tensor can be decoded again (a check
        pass before the pass that uses the values); a same-bytes tensor is then the staging itself.

        With a CUDA ``device``, int8/int4 payloads are dequantised there (the host only copies the
        packed bytes over; the values are bit-identical to the CPU decode); other codecs decode on
        the CPU.

        Raises:
            CommitMismatchError: payload digest differs from the header's.
            ManifestMismatchError: the codec returned another shape or dtype.
            NonFiniteError: NaN/Inf when ``require_finite``.
        """
        spec = self.spec
        buf = self._backing()
        if len(self.held) != self.num_chunks:
            raise StreamOrderError(
                f"tensor {spec.name!r} decoded with {len(self.held)}/{self.num_chunks} chunks"
            )
        self.verify_digest()
        if self._out is not None:
            out = self._out
        else:
            data = buf.read(0, self.encoded_bytes)
            if is_same_bytes(self.codec.name, spec.dtype):  # spilled to a file: the read is the copy
                out = (
                    torch.frombuffer(data, dtype=spec.dtype).reshape(spec.shape)
                    if len(data)
                    else (torch.empty(spec.shape, dtype=spec.dtype))
                )
            elif device is not None and device.type == "cuda" and isinstance(self.codec, AbsmaxCodec):
                out = decode_on_device(self.codec, data, spec.shape, spec.dtype, device)
            else:
                out = self.codec.decode(data, spec.shape, spec.dtype)
        if tuple(out.shape) != spec.shape or out.dtype != spec.dtype:
            raise ManifestMismatchError(
                f"codec {self.codec.name!r} decoded {spec.name!r} as {tuple(out.shape)} {out.dtype}, "
                f"header says {spec.shape} {spec.dtype}"
            )
        if require_finite:
            check_finite(out, spec.name)
        if release:
            self.release()
        return out
