"""``topk``: what it sends, its byte budget, error feedback, hostile payloads and option parsing.

The grid in ``test_codecs.py`` covers round trips within the stated bound for every codec; these
tests pin what is particular to the sparse codec.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dept_comm.codecs import (
    CodecParams,
    ErrorFeedback,
    codec_from_spec,
    codec_name,
    get_codec,
    parse_codec_spec,
)
from dept_comm.codecs.topk import keep_for
from dept_comm.codecs.zstd_bounded import compress
from dept_comm.errors import InvalidInputError, SizeLimitError, UnknownCodecError

PLAIN = CodecParams(block_size=64, keep=4, bits=4, zstd_level=0)  # a fixed layout to poke at


def _heavy(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_t(3, size=n).astype(np.float32))


def test_sends_each_blocks_largest_magnitudes_with_their_signs() -> None:
    codec = get_codec("topk", PLAIN)
    x = _heavy(64 * 5 + 10)
    y = codec.decode(codec.encode(x), x.shape)
    for start in range(0, x.numel(), 64):
        xb, yb = x[start : start + 64], y[start : start + 64]
        k = keep_for(xb.numel(), 4, 64)
        want = set(xb.abs().topk(k).indices.tolist())
        assert set(torch.nonzero(yb).flatten().tolist()) == want
        idx = torch.tensor(sorted(want))
        assert torch.equal(torch.sign(yb[idx]), torch.sign(xb[idx]))
        # the block's largest and smallest sent magnitudes survive up to bfloat16 rounding
        assert math.isclose(float(yb.abs().max()), float(xb.abs().max()), rel_tol=2**-8)


@pytest.mark.parametrize(("spec", "at_least"), [("topk:k=0.01,bits=2", 250), ("topk:k=0.02,bits=2", 140)])
def test_payload_is_far_below_fp32_and_within_its_own_cap(spec: str, at_least: float) -> None:
    codec = codec_from_spec(spec)
    x = _heavy(1 << 18)
    payload = codec.encode(x)
    assert len(payload) <= codec.max_encoded_bytes(x.numel())
    assert x.numel() * 4 / len(payload) >= at_least
    # the cap itself (no zstd gain) is what the receiver enforces before decoding
    plain = get_codec("topk", CodecParams(**{**_asdict(codec.params), "zstd_level": 0}))
    assert len(plain.encode(x)) == plain.max_encoded_bytes(x.numel())


def _asdict(p: CodecParams) -> dict[str, int]:
    return {"block_size": p.block_size, "zstd_level": p.zstd_level, "bits": p.bits, "keep": p.keep}


def test_error_feedback_sends_everything_eventually() -> None:
    """With feedback, the sum of what was decoded tracks the sum of the inputs: the gap is the
    residual, which stays bounded, so the relative error of the sum falls with the rounds."""
    codec = codec_from_spec("topk:k=0.05,bits=2,block=256")
    fb = ErrorFeedback(codec)
    g = _heavy(4096, seed=1)
    sent = torch.zeros_like(g)
    errors = []
    for r in range(1, 201):
        payload, decoded = fb.encode_with_decoded("w", g)
        assert torch.equal(decoded, codec.decode(payload, g.shape))
        sent += decoded
        residual = fb.residual("w")
        assert residual is not None
        assert torch.allclose(sent + residual, g * r, rtol=1e-4, atol=1e-2)  # nothing is lost
        errors.append(float((sent / r - g).norm() / g.norm()))
    assert errors[-1] < 0.25 * errors[19]
    assert errors[-1] < 0.1
    touched = (sent != 0).float().mean()
    assert touched > 0.9  # far beyond the 5% sent in any one round


def _fixed_payload(codec_params: CodecParams = PLAIN) -> tuple[bytearray, int]:
    codec = get_codec("topk", codec_params)
    return bytearray(codec.encode(_heavy(128))), 2 * 4  # two blocks: scales take 8 bytes


def test_repeated_index_is_refused() -> None:
    codec = get_codec("topk", PLAIN)
    payload, s_end = _fixed_payload()
    payload[s_end + 1] = 0  # the second delta (low byte) of block 0: offset repeats
    payload[s_end + 8 + 1] = 0  # its high byte (the high plane starts after 8 low bytes)
    with pytest.raises(InvalidInputError, match="repeats an index"):
        codec.decode(bytes(payload), (128,))


def test_index_past_the_block_is_refused() -> None:
    codec = get_codec("topk", PLAIN)
    payload, s_end = _fixed_payload()
    payload[s_end + 8 + 7] = 0xFF  # the high byte of block 1's last delta: offset far past 64
    with pytest.raises(InvalidInputError, match="past its block"):
        codec.decode(bytes(payload), (128,))
    payload, s_end = _fixed_payload()
    payload[s_end + 3] = 64  # block 0's last delta alone takes it to 64 or more
    with pytest.raises(InvalidInputError, match="past its block"):
        codec.decode(bytes(payload), (128,))


def test_wrong_lengths_and_bombs_are_refused() -> None:
    codec = get_codec("topk")  # zstd on
    n = 1 << 16
    cap = codec.max_encoded_bytes(n)
    with pytest.raises(SizeLimitError):
        codec.decode(bytes(cap + 1), (n,))
    with pytest.raises(InvalidInputError):
        codec.decode(b"\x07" + bytes(10), (n,))  # unknown mode byte
    bomb = b"\x01" + compress(bytes(64 << 20), 3)  # 64 MiB of zeros in a few KiB
    assert len(bomb) <= cap
    with pytest.raises(SizeLimitError):
        codec.decode(bomb, (n,))
    with pytest.raises(InvalidInputError):
        codec.decode(b"\x01" + b"not zstd at all", (n,))


def test_non_finite_block_decodes_non_finite_and_hostile_scales_too() -> None:
    codec = get_codec("topk", PLAIN)
    x = _heavy(128)
    x[70] = math.nan
    y = codec.decode(codec.encode(x), x.shape)
    assert bool(torch.isfinite(y[:64]).all())
    assert bool(torch.isnan(y[64:]).any())
    payload = bytearray(codec.encode(_heavy(128)))
    payload[2:4] = (0x7F80).to_bytes(2, "little")  # block 0's hi scale: +inf
    with np.errstate(all="raise"):
        out = codec.decode(bytes(payload), (128,))
    assert not bool(torch.isfinite(out[:64]).all()) and bool(torch.isfinite(out[64:]).all())


@pytest.mark.parametrize(
    "params",
    [
        CodecParams(block_size=64, keep=0, bits=2),
        CodecParams(block_size=64, keep=65, bits=2),
        CodecParams(block_size=8, keep=1, bits=2),
        CodecParams(block_size=(1 << 16) + 1, keep=1, bits=2),
        CodecParams(block_size=64, keep=4, bits=3),
        CodecParams(block_size=64, keep=4, bits=0),
        CodecParams(block_size=64, keep=4, bits=2, zstd_level=23),
    ],
)
def test_bad_params_are_refused(params: CodecParams) -> None:
    with pytest.raises(InvalidInputError):
        get_codec("topk", params)


def test_spec_parsing() -> None:
    name, params = parse_codec_spec("topk:k=0.02,bits=2")
    assert name == "topk" and params == CodecParams(block_size=4096, keep=82, bits=2, zstd_level=1)
    assert parse_codec_spec("topk:k=0.01, bits=4, block=1024, zstd=0")[1] == CodecParams(
        block_size=1024, keep=10, bits=4, zstd_level=0
    )
    assert parse_codec_spec("topk:k=1e-9")[1] == CodecParams(block_size=4096, keep=1, bits=2, zstd_level=1)
    assert parse_codec_spec("int8") == ("int8", None)
    assert get_codec("topk:k=0.01").params.keep == 41  # get_codec takes a spec without params
    assert codec_name("topk:k=0.01,bits=4") == "topk" and codec_name("int4") == "int4"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("topk:k=0", r"k=0.0 must be in \(0, 1\]"),
        ("topk:k=1.5", r"must be in \(0, 1\]"),
        ("topk:k=nan", r"must be in \(0, 1\]"),
        ("topk:k=abc", "not a number"),
        ("topk:bits=3", r"bits=3 must be one of \[2, 4, 8\]"),
        ("topk:bits=two", "not an integer"),
        ("topk:density=0.1", "unknown topk option 'density'"),
        ("topk:k=0.1,k=0.2", "given twice"),
        ("topk:k", "malformed topk option"),
        ("topk:", "malformed topk option"),
        ("topk:block=8", r"block=8 must be in \[16, 65536\]"),
        ("topk:zstd=40", "zstd_level 40"),
        ("int8:k=0.1", "takes no options"),
        ("", "empty codec spec"),
    ],
)
def test_spec_errors_are_clear(spec: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        parse_codec_spec(spec)


def test_unknown_codec_in_a_spec() -> None:
    with pytest.raises(UnknownCodecError, match="unknown codec 'top'"):
        parse_codec_spec("top:k=0.1")
