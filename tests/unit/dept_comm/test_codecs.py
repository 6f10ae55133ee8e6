"""Codecs: every registered codec round-trips within its stated bound; bad payloads are rejected.

Round-trip and rejection tests iterate ``codec_names()``, so a new codec is covered as soon as it
registers. Bounds per element (for float32 input ``x``):

* lossless codecs (``codec.lossless``): bit for bit;
* ``bf16``, ``bf16-zstd``: ``|err| <= |x| * 2**-8 + 2**-134`` (round to nearest even);
* ``int8`` / ``int4`` (absmax, ``qmax`` 127 / 7): ``|err| <= absmax_block / qmax / 2 * (1 + 2**-7)``
  plus float rounding (``absmax * 2**-20``) and ``2**-126`` (the smallest scale);
* ``topk``: per block, an element not sent is at most the block's k-th largest magnitude ``thr``;
  one sent is within half a magnitude step ``(absmax - thr) / (2**(bits-1) - 1) / 2`` plus the
  bfloat16 rounding of the block's two scales (``absmax * 2**-7``) and ``2**-126``;
* any other lossy codec: finite output and relative L2 error below 0.5 (a smoke bound).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dept_comm.codecs import CodecParams, codec_names, get_codec
from dept_comm.codecs.bf16 import Bf16
from dept_comm.codecs.topk import keep_for
from dept_comm.codecs.zstd_bounded import compress
from dept_comm.errors import (
    DeptError,
    InvalidInputError,
    ManifestMismatchError,
    SizeLimitError,
    UnknownCodecError,
)

NAMES = codec_names()
FLOAT_NAMES = [n for n in NAMES if n != "raw"]  # raw stores any dtype as is; the rest are float codecs
QUANTISERS = {"int8": 127, "int4": 7}
BF16_LIKE = {"bf16", "bf16-zstd"}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaN == NaN and -0.0 != 0.0 in comparisons."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.reshape(-1).abs()
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)
    return blocks.amax(1).repeat_interleave(block)[: flat.numel()]


def _bound(name: str, codec: object, x: torch.Tensor) -> torch.Tensor | None:
    """Largest allowed |decode - x| per element (flat), None for codecs without a stated bound."""
    flat = x.reshape(-1)
    if name in BF16_LIKE:
        return flat.abs() * 2.0**-8 + 2.0**-134
    if name in QUANTISERS:
        absmax = _block_absmax(flat, codec.params.block_size)  # type: ignore[attr-defined]
        return absmax / QUANTISERS[name] / 2 * (1 + 2.0**-7) + absmax * 2.0**-20 + 2.0**-126
    if name == "topk":
        return _topk_bound(flat, codec.params)  # type: ignore[attr-defined]
    return None


def _topk_bound(flat: torch.Tensor, p: CodecParams) -> torch.Tensor:
    out = torch.empty_like(flat)
    top = (1 << (p.bits - 1)) - 1
    for start in range(0, flat.numel(), p.block_size):
        mags = flat[start : start + p.block_size].abs()
        k = keep_for(mags.numel(), p.keep, p.block_size)
        thr = float(mags.topk(k).values.min())
        absmax = float(mags.max())
        sent = (absmax - thr) / top / 2 if top else absmax - thr
        out[start : start + mags.numel()] = max(thr, sent + absmax * 2.0**-7) + 2.0**-126
    return out


def _check_round_trip(name: str, x_in: torch.Tensor, params: CodecParams | None = None) -> None:
    codec = get_codec(name, params)
    payload = codec.encode(x_in)
    assert isinstance(payload, bytes)
    assert len(payload) <= codec.max_encoded_bytes(x_in.numel())
    shape = tuple(x_in.shape)
    if name == "raw":
        out = codec.decode(payload, shape, x_in.dtype)
        assert out.dtype == x_in.dtype and out.shape == x_in.shape
        assert torch.equal(_bits(out), _bits(x_in))
        return
    x = x_in.to(torch.float32)
    out = codec.decode(payload, shape, torch.float32)
    assert out.dtype == torch.float32 and tuple(out.shape) == shape
    # decoding to the input's dtype is the float32 decode, cast
    if x_in.dtype != torch.float32:
        cast = codec.decode(payload, shape, x_in.dtype)
        assert cast.dtype == x_in.dtype and tuple(cast.shape) == shape
        assert torch.equal(_bits(cast), _bits(out.to(x_in.dtype)))
    if codec.lossless:
        assert torch.equal(_bits(out), _bits(x))
        return
    bound = _bound(name, codec, x)
    err = (out.reshape(-1) - x.reshape(-1)).abs()
    if bound is not None:
        worst = int(torch.argmax(err - bound)) if err.numel() else 0
        assert bool((err <= bound).all()), (
            name,
            x.reshape(-1)[worst].item(),
            err[worst].item(),
            bound[worst].item(),
        )
    else:
        assert bool(torch.isfinite(out).all())
        assert float(err.norm()) <= 0.5 * float(x.norm()) + 1e-30


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 70 if ndim > 1 else 3000), min_size=ndim, max_size=ndim)))
    n = math.prod(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "uniform", "heavy", "sparse", "constant", "tiny", "huge"]))
    if kind == "normal":
        v = rng.standard_normal(n)
    elif kind == "uniform":
        v = rng.uniform(-1, 1, n)
    elif kind == "heavy":
        v = rng.standard_cauchy(n)
    elif kind == "sparse":
        v = rng.standard_normal(n) * (rng.random(n) < 0.05)
    elif kind == "constant":
        v = np.full(n, rng.standard_normal())
    elif kind == "tiny":
        v = rng.standard_normal(n) * 1e-39  # float32 subnormals
    else:
        v = rng.standard_normal(n) * 1e37
    v = v * 10.0 ** draw(st.integers(-6, 3)) if kind in ("normal", "uniform", "sparse") else v
    dtype = draw(st.sampled_from(DTYPES))
    # beyond 1e38 round-to-nearest-even to bf16 may overflow to inf; fp16 stops at 65504
    limit = 6e4 if dtype == torch.float16 else 1e38
    v = np.clip(v, -limit, limit)
    return torch.from_numpy(v.astype(np.float32)).reshape(shape).to(dtype)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(x=tensors())
def test_round_trip_within_bound(name: str, x: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy/torch warnings on the hot path
        _check_round_trip(name, x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (2, 0, 3), (127,), (128,), (129,), (257, 3), (1000, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_edge_shapes(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + 7)
    _check_round_trip(name, torch.randn(shape, generator=gen).to(dtype))


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(
    values=st.lists(st.floats(width=32, min_value=-(2.0**126), max_value=2.0**126), min_size=1, max_size=300)
)
def test_round_trip_arbitrary_floats(name: str, values: list[float]) -> None:
    _check_round_trip(name, torch.tensor(values, dtype=torch.float32))


@pytest.mark.parametrize("name", sorted(QUANTISERS))
@pytest.mark.parametrize("block", [16, 64, 128, 256, 1000])
@pytest.mark.parametrize("level", [0, 1, 3])
def test_quantiser_params_round_trip(name: str, block: int, level: int) -> None:
    gen = torch.Generator().manual_seed(block + level)
    x = torch.randn(3 * block + 5, generator=gen) * torch.logspace(-3, 3, 3 * block + 5)
    params = CodecParams(block_size=block, zstd_level=level)
    _check_round_trip(name, x, params)
    codec = get_codec(name, params)
    assert codec.params == CodecParams(block_size=block, zstd_level=level, bits=8 if name == "int8" else 4)
    # a receiver rebuilds the codec from the params the sender reports
    again = get_codec(name, codec.params)
    assert torch.equal(again.decode(codec.encode(x), x.shape), codec.decode(codec.encode(x), x.shape))


# -- registry and params -------------------------------------------------------------------


def test_registry_every_name_builds_and_round_trips() -> None:
    assert {"fp32", "raw", "bf16", "bf16-zstd", "int8", "int4"} <= set(NAMES)
    x = torch.randn(300, 7)
    for name in NAMES:
        codec = get_codec(name)
        assert codec.name == name
        assert isinstance(codec.params, CodecParams)
        out = codec.decode(codec.encode(x), x.shape)
        assert out.shape == x.shape and bool(torch.isfinite(out).all())
        assert get_codec(name, codec.params).params == codec.params


def test_unknown_codec_name() -> None:
    with pytest.raises(UnknownCodecError):
        get_codec("int3")


def test_default_params() -> None:
    assert get_codec("int8").params == CodecParams(block_size=128, zstd_level=1, bits=8)
    assert get_codec("int4").params == CodecParams(block_size=128, zstd_level=1, bits=4)
    assert get_codec("bf16-zstd").params == CodecParams(zstd_level=1)
    # explicit params are literal: zstd_level 0 is "no zstd stage", block_size 0 the default
    assert get_codec("int8", CodecParams(block_size=64)).params == CodecParams(block_size=64, bits=8)
    assert get_codec("int4", CodecParams(bits=4)).params == CodecParams(block_size=128, bits=4)


@pytest.mark.parametrize("name", sorted(QUANTISERS))
@pytest.mark.parametrize(
    "params",
    [
        CodecParams(block_size=8),
        CodecParams(block_size=15),
        CodecParams(block_size=129),
        CodecParams(block_size=(1 << 16) + 2),
        CodecParams(block_size=-128),
        CodecParams(block_size=128, bits=2),
        CodecParams(block_size=128, zstd_level=23),
        CodecParams(block_size=128, zstd_level=-100),
    ],
)
def test_quantiser_params_out_of_range(name: str, params: CodecParams) -> None:
    with pytest.raises(InvalidInputError):
        get_codec(name, params)


def test_bits_of_the_other_quantiser_rejected() -> None:
    with pytest.raises(InvalidInputError):
        get_codec("int8", CodecParams(bits=4))
    with pytest.raises(InvalidInputError):
        get_codec("int4", CodecParams(bits=8))


def test_bf16_zstd_level_out_of_range() -> None:
    with pytest.raises(InvalidInputError):
        get_codec("bf16-zstd", CodecParams(zstd_level=99))


# -- bf16 ----------------------------------------------------------------------------------


def _rne_reference(bits: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 on bit patterns (non-NaN inputs)."""
    u = bits.astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_bf16_rounds_to_nearest_even_on_random_bit_patterns() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=1 << 18, dtype=np.uint64).astype(np.uint32)
    # ties: low half exactly 0x8000, with even and odd kept halves
    bits[:1000] = (bits[:1000] & 0xFFFF0000) | 0x8000
    x = torch.from_numpy(bits.view(np.float32).copy())
    codec = Bf16()
    got = np.frombuffer(codec.encode(x), dtype="<u2")
    nan = np.isnan(bits.view(np.float32))
    assert np.array_equal(got[~nan], _rne_reference(bits[~nan]))
    # NaN stays NaN, including NaNs whose payload is only in the low half (truncation gives inf)
    out = codec.decode(codec.encode(x), x.shape)
    assert bool(torch.isnan(out[torch.from_numpy(nan)]).all())


def test_bf16_special_values() -> None:
    special = np.array(
        [0x7F800001, 0xFF800001, 0x7FC00000, 0x7F800000, 0xFF800000, 0x80000000, 0, 1, 0x7F7FFFFF],
        dtype=np.uint32,
    )
    x = torch.from_numpy(special.view(np.float32).copy())
    out = get_codec("bf16").decode(get_codec("bf16").encode(x), x.shape)
    assert bool(torch.isnan(out[:3]).all())
    assert out[3] == math.inf and out[4] == -math.inf
    assert _bits(out[5:6]).item() == _bits(torch.tensor([-0.0])).item()
    assert out[6] == 0 and out[7] == 0  # the smallest subnormal rounds to zero (even)
    assert out[8] == math.inf  # float32 max rounds up past bfloat16 max


def test_bf16_zstd_decodes_exactly_what_bf16_decodes() -> None:
    gen = torch.Generator().manual_seed(3)
    for x in (
        torch.randn(100_003, generator=gen),
        torch.randn(64, 33, generator=gen) * 1e-3,
        torch.zeros(5000),
    ):
        plain = get_codec("bf16")
        packed = get_codec("bf16-zstd")
        payload = packed.encode(x)
        for dtype in DTYPES:
            a = plain.decode(plain.encode(x), x.shape, dtype)
            b = packed.decode(payload, x.shape, dtype)
            assert torch.equal(_bits(a), _bits(b))
    assert len(get_codec("bf16-zstd").encode(torch.randn(100_000))) < 2 * 100_000  # it pays


def test_bf16_decodes_straight_to_bf16() -> None:
    x = torch.randn(1000)
    out = get_codec("bf16").decode(get_codec("bf16").encode(x), x.shape, torch.bfloat16)
    assert torch.equal(_bits(out), _bits(x.to(torch.bfloat16)))


# -- quantisers ----------------------------------------------------------------------------


def test_int4_layout_scales_then_nibbles_low_first() -> None:
    codec = get_codec("int4", CodecParams(block_size=16, zstd_level=0))
    x = torch.tensor([7.0, -7.0, 0.0, 1.0, -1.0])  # absmax 7: scale 1.0, bf16 0x3F80
    payload = codec.encode(x)
    assert payload == bytes([0x80, 0x3F, 0x97, 0x10, 0x0F])  # (7, -7), (0, 1), (-1, pad 0)
    assert torch.equal(codec.decode(payload, x.shape), x)


def test_int8_layout() -> None:
    codec = get_codec("int8", CodecParams(block_size=16, zstd_level=0))
    x = torch.tensor([127.0, -127.0, 0.0, 64.4])
    assert codec.encode(x) == bytes([0x80, 0x3F, 127, 0x81, 0, 64])


@pytest.mark.parametrize("name", sorted(QUANTISERS))
def test_quantiser_zero_and_tiny_blocks(name: str) -> None:
    codec = get_codec(name, CodecParams(block_size=16))
    x = torch.zeros(48)
    x[16:32] = torch.randn(16) * 1e-40  # subnormal block
    x[32:] = -0.0
    out = codec.decode(codec.encode(x), x.shape)
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[:16], torch.zeros(16)) and torch.equal(out[32:].abs(), torch.zeros(16))
    assert bool(((out[16:32] - x[16:32]).abs() <= 2.0**-126).all())


@pytest.mark.parametrize("name", sorted(QUANTISERS) + sorted(BF16_LIKE))
def test_non_finite_input_decodes_non_finite_without_warnings(name: str) -> None:
    codec = get_codec(name, CodecParams(block_size=16, zstd_level=1) if name in QUANTISERS else None)
    x = torch.randn(64)
    x[3], x[20], x[40] = math.nan, math.inf, -math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = codec.decode(codec.encode(x), x.shape)
    if name in QUANTISERS:  # the whole block is NaN, the finite block is intact
        assert bool(torch.isnan(out[:48]).all())
        assert bool(torch.isfinite(out[48:]).all())
    else:
        assert math.isnan(out[3]) and out[20] == math.inf and out[40] == -math.inf


@pytest.mark.parametrize("name", sorted(QUANTISERS))
@pytest.mark.parametrize("scale_bits", [0x7FC0, 0x7F80, 0xFF80, 0x7F81])
def test_hostile_non_finite_scale_decodes_to_non_finite(name: str, scale_bits: int) -> None:
    codec = get_codec(name, CodecParams(block_size=16, zstd_level=0))
    x = torch.randn(40)
    payload = bytearray(codec.encode(x))
    payload[2:4] = scale_bits.to_bytes(2, "little")  # the second block's scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = codec.decode(bytes(payload), x.shape)
    assert not bool(torch.isfinite(out[16:32]).any())
    assert bool(torch.isfinite(out[:16]).all()) and bool(torch.isfinite(out[32:]).all())


@pytest.mark.parametrize("name", sorted(QUANTISERS))
def test_quantiser_zstd_stage_pays_or_stores(name: str) -> None:
    codec = get_codec(name)
    smooth = torch.randn(1 << 16) * torch.rand(1 << 16).pow(4)  # peaked values: compressible
    plain = get_codec(name, CodecParams(block_size=128))
    assert len(codec.encode(smooth)) < len(plain.encode(smooth))
    tiny = torch.randn(20)
    assert len(codec.encode(tiny)) == len(plain.encode(tiny)) + 1  # stored: mode byte only


# -- rejection -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOAT_NAMES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.bool])
def test_integer_dtype_rejected(name: str, dtype: torch.dtype) -> None:
    codec = get_codec(name)
    with pytest.raises(ManifestMismatchError):
        codec.decode(codec.encode(torch.randn(10)), (10,), dtype)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_payload_length_rejected(name: str) -> None:
    codec = get_codec(name)
    x = torch.randn(1000)
    payload = codec.encode(x)
    with pytest.raises(SizeLimitError):
        codec.decode(payload + bytes(codec.max_encoded_bytes(1000) + 1), x.shape)
    with pytest.raises(InvalidInputError):
        codec.decode(payload[:-1], x.shape)
    with pytest.raises(InvalidInputError):
        codec.decode(payload[: len(payload) // 2], x.shape)
    with pytest.raises(InvalidInputError):
        codec.decode(b"", x.shape)
    if name != "topk":  # topk sends as many values for 1001 elements as for 1000 (same length)
        with pytest.raises(InvalidInputError):  # a payload for another shape
            codec.decode(payload, (1001,))
    with pytest.raises(SizeLimitError):  # an empty tensor has an empty payload
        codec.decode(b"\x00", (0,))


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_negative_shape_rejected(name: str) -> None:
    with pytest.raises(InvalidInputError):
        get_codec(name).decode(b"", (-1, 4))


def _compressible(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.rand(n, generator=gen).pow(4)


@pytest.mark.parametrize("name", ["bf16-zstd", "int8", "int4"])
def test_zstd_payload_truncated_corrupt_or_padded_rejected(name: str) -> None:
    codec = get_codec(name)
    x = _compressible(50_000)
    payload = codec.encode(x)
    assert payload[0] == 1  # zstd mode
    for bad in (
        payload[:-1],
        payload[:-5],
        payload[: len(payload) // 2],
        payload + b"\x00",
        payload[:40] + bytes([payload[40] ^ 0x5A]) + payload[41:],
        payload[: len(payload) // 2]
        + bytes([payload[len(payload) // 2] ^ 0x01])
        + payload[len(payload) // 2 + 1 :],
        b"\x07" + payload[1:],  # unknown mode byte
        b"\x01" + compress(b"\x00" * 100, 1),  # a valid frame of the wrong size
    ):
        with pytest.raises(InvalidInputError):
            codec.decode(bad, x.shape)
    stored = b"\x00" + bytes(codec.max_encoded_bytes(x.numel()) - 1)
    codec.decode(stored, x.shape)  # a stored body of the right length is well-formed
    with pytest.raises(SizeLimitError):
        codec.decode(stored[:-1], x.shape)


@pytest.mark.parametrize("name", ["bf16-zstd", "int8", "int4"])
def test_decompression_bomb_in_payload_rejected(name: str) -> None:
    codec = get_codec(name)
    numel = 1 << 16
    bomb = compress(bytes(16 << 20), 3)  # 16 MiB of zeros in a few KiB
    assert len(bomb) < codec.max_encoded_bytes(numel)
    with pytest.raises(SizeLimitError):
        codec.decode(b"\x01" + bomb, (numel,))


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_fuzzed_payloads_never_crash(name: str, data: st.DataObject) -> None:
    codec = get_codec(name)
    x = _compressible(data.draw(st.integers(1, 3000)), data.draw(st.integers(0, 2**16)))
    payload = bytearray(codec.encode(x))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and payload:
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut" and payload:
            del payload[data.draw(st.integers(0, len(payload) - 1)) :]
        else:
            payload.insert(data.draw(st.integers(0, len(payload))), data.draw(st.integers(0, 255)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = codec.decode(bytes(payload), x.shape)
    except DeptError:
        return
    assert out.shape == x.shape and out.dtype == torch.float32
