"""Blockwise absmax ``int8``/``int4`` quantisation on the tensor's device, byte-identical to the CPU codecs.

A worker training on CUDA quantises its update where it lives: the GPU computes the scales, the
values (int4 packed two per byte) and the error-feedback residual, and the host receives only the
packed body, on which it runs the codec's remaining stage (``_common.seal``: the mode byte and zstd
where it pays). The payload is the CPU codec's, byte for byte, so the wire format and every
receiver are unchanged; the residual is the CPU ``ErrorFeedback``'s, bit for bit.

Two implementations of the same arithmetic (that of ``dept_comm.codecs._absmax``, in the same
order, IEEE float32, round half to even):

* ``triton``: one fused kernel (``triton_absmax``), on CUDA where ``triton`` imports, or on CPU
  under the Triton interpreter (``TRITON_INTERPRET=1``, for tests);
* ``torch``: eager torch operations on any device, the fallback and the readable statement of the
  algorithm. Divisions are tensor by tensor on purpose: CUDA divides by a CPU scalar as a
  multiplication by its reciprocal, which can differ in the last bit.

``decode_on_device`` decodes a payload into a tensor on the device (pulls). ``DeviceErrorFeedback``
is ``ErrorFeedback`` with the residuals kept on the device; ``make_feedback`` picks it for absmax
codecs on CUDA and the CPU class otherwise.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dept_comm.codecs._absmax import MIN_SCALE, AbsmaxCodec
from dept_comm.codecs._common import check_float_dtype, finish, numel_of, seal, unseal
from dept_comm.codecs.base import Codec
from dept_comm.codecs.feedback import ErrorFeedback
from dept_comm.errors import ManifestMismatchError

logger = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "torch")
_NAN_BITS = 0x7FC00000
_HIGH_HALF = -65536


@functools.cache
def triton_module() -> Any | None:
    """``dept_comm.codecs.triton_absmax`` if ``triton`` imports, else None."""
    try:
        from dept_comm.codecs import triton_absmax
    except ImportError as err:  # triton is optional (GPU hosts have it)
        logger.debug("triton unavailable: %s", err)
        return None
    return triton_absmax


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """``triton`` or ``torch`` for ``impl`` on ``device``: ``auto`` takes Triton on CUDA when it imports.

    Raises:
        ValueError: unknown ``impl``, or ``triton`` asked for where it cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    can_triton = triton_module() is not None and (device.type == "cuda" or _interpreting())
    if impl == "auto":
        return "triton" if can_triton and device.type == "cuda" else "torch"
    if impl == "triton" and not can_triton:
        raise ValueError("the triton path needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    return impl


def _layout(codec: AbsmaxCodec, n: int) -> tuple[int, int, int]:
    block = codec.params.block_size
    nblocks = -(-n // block)
    return block, nblocks, codec._value_bytes(n)


def _padded(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` followed by zeros up to ``length`` elements (no copy when it already has them)."""
    if t.numel() == length:
        return t
    out = t.new_zeros(length)
    out[: t.numel()] = t
    return out


def _encode_torch(
    target: torch.Tensor, codec: AbsmaxCodec, scales: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """The torch statement of the kernel: fills ``scales`` (int16) and ``values`` (uint8); returns
    the decoded values (float32, ``target``'s length)."""
    n = target.numel()
    block, nblocks, _ = _layout(codec, n)
    xb = _padded(target, nblocks * block).view(nblocks, block)  # zeros do not change absmax
    nonfinite = ~torch.isfinite(xb).all(dim=1)
    absmax = torch.where(nonfinite, 0.0, xb.abs().amax(dim=1))
    bits = (absmax / torch.full_like(absmax, codec.qmax)).view(torch.int32)
    bits = (bits + 0xFFFF) & _HIGH_HALF  # round the scale up to bfloat16
    scale = torch.clamp_min(bits.view(torch.float32), MIN_SCALE)
    inv = torch.where(nonfinite, 0.0, torch.ones_like(scale) / scale)
    sbits = torch.where(nonfinite, _NAN_BITS, scale.view(torch.int32))
    scales.copy_((sbits >> 16).to(torch.int16))
    q = torch.round(xb * inv[:, None])  # round half to even, like numpy's rint
    q = torch.where(nonfinite[:, None], 0.0, q)
    q8 = q.to(torch.int8).view(-1)
    if codec.bits == 8:
        values.copy_(q8[:n].view(torch.uint8))
    else:
        pairs = q8.view(-1, 2).to(torch.int32)  # blocks are even-sized: pairs never straddle blocks
        packed = (pairs[:, 0] & 15) | ((pairs[:, 1] & 15) << 4)
        values.copy_(packed[: values.numel()].to(torch.uint8))
    decoded: torch.Tensor = (q * sbits.view(torch.float32)[:, None]).view(-1)[:n]
    return decoded


def _decode_body(codec: AbsmaxCodec, scales: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """float32 values from int16 scale bits and value bytes, on their device (the CPU decode's
    ``q * scale``)."""
    block, nblocks, _ = _layout(codec, n)
    scale = (scales.to(torch.int32) << 16).view(torch.float32)
    if codec.bits == 8:
        q = values.view(torch.int8).to(torch.float32)
    else:
        b = values.to(torch.int32)
        nib = torch.stack((b & 15, b >> 4), dim=1).view(-1)
        q = (nib - ((nib & 8) << 1)).to(torch.float32)  # sign-extend the two's-complement nibbles
    q = _padded(q[:n], nblocks * block).view(nblocks, block)
    out: torch.Tensor = (q * scale[:, None]).view(-1)[:n]
    return out


def _check_encodable(codec: Codec, x: torch.Tensor) -> AbsmaxCodec:
    if not isinstance(codec, AbsmaxCodec):
        raise ManifestMismatchError(f"codec {codec.name} has no device encoder (int8/int4 only)")
    if not x.dtype.is_floating_point:
        raise ManifestMismatchError(f"float codecs cannot encode dtype {x.dtype}")
    return codec


def encode_into(
    codec: Codec,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    update_residual: torch.Tensor | None,
    out: torch.Tensor,
    *,
    impl: str = "auto",
) -> None:
    """The device part of :func:`encode_on_device`: write the body (scale bits, then the value bytes)
    into ``out[1:]`` (uint8 on ``x``'s device, ``1 + body`` bytes; ``out[0]`` is left for the mode
    byte) and the new residual into ``update_residual`` if given. ``x`` is flat and non-empty."""
    absmax = _check_encodable(codec, x)
    flat = x.detach().reshape(-1)
    flat = (flat if flat.dtype == torch.float32 else flat.to(torch.float32)).contiguous()
    n = flat.numel()
    _, nblocks, _ = _layout(absmax, n)
    scales = torch.empty(nblocks, dtype=torch.int16, device=flat.device)
    values = out[1 + 2 * nblocks :]
    r = residual.reshape(-1) if residual is not None else None
    if resolve_impl(impl, flat.device) == "triton":
        module = triton_module()
        assert module is not None
        module.encode_triton(
            flat,
            r,
            update_residual.view(-1) if update_residual is not None else None,
            scales,
            values,
            block=absmax.params.block_size,
            qmax=absmax.qmax,
            bits=absmax.bits,
        )
    else:
        target = flat if r is None else flat + r
        decoded = _encode_torch(target, absmax, scales, values)
        if update_residual is not None:
            torch.sub(target, decoded, out=update_residual.view(-1))
    out[1 : 1 + 2 * nblocks] = scales.view(torch.uint8)


def body_buffer(codec: Codec, numel: int, device: torch.device | str) -> torch.Tensor:
    """An uninitialised ``1 + body`` byte buffer for :func:`encode_into`."""
    absmax = _check_encodable(codec, torch.empty(0))
    _, nblocks, value_bytes = _layout(absmax, numel)
    return torch.empty(1 + 2 * nblocks + value_bytes, dtype=torch.uint8, device=device)


def encode_on_device(
    codec: Codec,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    update_residual: torch.Tensor | None = None,
    impl: str = "auto",
) -> bytes:
    """The payload ``codec.encode(x + residual)`` would return, computed on ``x``'s device.

    ``x`` (any float dtype, any device) is read as float32; ``residual`` (float32, same device,
    same number of elements) is added first. If ``update_residual`` is given (float32, same device;
    it may be ``residual`` itself) it receives ``x + residual - decoded``, as ``ErrorFeedback`` keeps.
    Only the packed body crosses to the host, where ``seal`` adds the codec's zstd stage.

    Raises:
        ManifestMismatchError: ``codec`` is not a blockwise absmax codec, or a non-float ``x``.
    """
    absmax = _check_encodable(codec, x)
    if x.numel() == 0:
        return b""
    out = body_buffer(absmax, x.numel(), x.device)
    encode_into(absmax, x, residual, update_residual, out, impl=impl)
    host = out.cpu().numpy()  # the only device-to-host copy: the packed body
    return seal(host, absmax.params.zstd_level)


def decode_on_device(
    codec: Codec,
    data: bytes | memoryview,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cuda",
) -> torch.Tensor:
    """``codec.decode(data, shape, dtype)``, with the values computed on ``device``: the host
    undoes the zstd stage and copies the packed body over; the same checks as the CPU decode apply.

    Raises:
        ManifestMismatchError: not an absmax codec, or a non-float ``dtype``.
        SizeLimitError, InvalidInputError: as ``codec.decode`` for malformed payloads.
    """
    if not isinstance(codec, AbsmaxCodec):
        raise ManifestMismatchError(f"codec {codec.name} has no device decoder (int8/int4 only)")
    check_float_dtype(codec.name, dtype)
    n = numel_of(shape)
    _, nblocks, value_bytes = _layout(codec, n)
    body = unseal(codec.name, data, 2 * nblocks + value_bytes if n else 0, codec.params.zstd_level)
    if n == 0:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    raw = torch.frombuffer(bytearray(body), dtype=torch.uint8).to(device)
    scales = raw[: 2 * nblocks].view(torch.int16)
    out = _decode_body(codec, scales, raw[2 * nblocks :], n)
    return finish(out, shape, dtype)


class DeviceErrorFeedback(ErrorFeedback):
    """``ErrorFeedback`` for an absmax codec with residuals on ``device``: same payloads, same
    residuals (bit for bit), but the host only sees packed bytes. State dicts are CPU float32,
    interchangeable with ``ErrorFeedback``'s."""

    def __init__(self, codec: Codec, device: torch.device | str, impl: str = "auto") -> None:
        if not isinstance(codec, AbsmaxCodec):
            raise ManifestMismatchError(f"codec {codec.name} has no device encoder (int8/int4 only)")
        super().__init__(codec)
        self.device = torch.device(device)
        self.impl = resolve_impl(impl, self.device)

    def encode(self, name: str, x: torch.Tensor) -> bytes:
        """The payload for ``x`` plus the stored residual; updates the residual (on the device)."""
        shape = tuple(x.shape)
        flat = x.detach().to(self.device).reshape(-1)
        residual = self._residuals.get(name)
        if residual is not None and tuple(residual.shape) != shape:
            raise ManifestMismatchError(
                f"error feedback for {name!r}: residual has shape {list(residual.shape)}, "
                f"tensor has {list(shape)}"
            )
        new = (
            residual if residual is not None else torch.empty(shape, dtype=torch.float32, device=self.device)
        )
        payload = encode_on_device(self.codec, flat, residual, update_residual=new, impl=self.impl)
        self._residuals[name] = new
        return payload

    def encode_with_decoded(self, name: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """The payload and what it decodes to (float32, ``x``'s shape, on the device)."""
        payload = self.encode(name, x)
        decoded = decode_on_device(self.codec, payload, tuple(x.shape), torch.float32, self.device)
        return payload, decoded

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU float32 copies of every residual (what ``ErrorFeedback.state_dict`` returns)."""
        return {name: r.detach().to("cpu", torch.float32).clone() for name, r in self._residuals.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace every residual with float32 copies of ``state``'s on the device."""
        super().load_state_dict(state)
        self._residuals = {name: r.to(self.device) for name, r in self._residuals.items()}


def device_feedback_reason(codec: Codec, device: torch.device | str) -> str | None:
    """Why ``make_feedback`` keeps the CPU path for this codec and device, or None if it will not."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        return f"{device!r} is not one torch device"
    if dev.type != "cuda":
        return f"device {dev} is not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not isinstance(codec, AbsmaxCodec):
        return f"codec {codec.name} has no device encoder"
    return None


def make_feedback(codec: Codec, device: torch.device | str) -> ErrorFeedback:
    """``DeviceErrorFeedback`` for int8/int4 on a CUDA device, else the CPU ``ErrorFeedback``."""
    reason = device_feedback_reason(codec, device)
    if reason is not None:
        logger.debug("error feedback on the CPU: %s", reason)
        return ErrorFeedback(codec)
    return DeviceErrorFeedback(codec, device)
