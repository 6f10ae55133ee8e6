"""Error feedback: the accumulated error of repeated encodes falls like 1/k; state round-trips."""

from __future__ import annotations

import pytest
import torch

from dept_comm.codecs import CodecParams, ErrorFeedback, codec_names, get_codec
from dept_comm.errors import ManifestMismatchError

LOSSY = ["int4", "int8", "bf16", "bf16-zstd"]


def _accumulated_rel_errors(
    fb: ErrorFeedback | None, codec_name: str, x: torch.Tensor, steps: int
) -> list[float]:
    """rel(k) = ||sum_{i<=k} decoded_i - k x|| / (k ||x||) for k = 1..steps."""
    codec = get_codec(codec_name)
    total = torch.zeros_like(x)
    rel = []
    for k in range(1, steps + 1):
        if fb is None:
            decoded = codec.decode(codec.encode(x), x.shape)
        else:
            payload, decoded = fb.encode_with_decoded("w", x)
            assert torch.equal(decoded, codec.decode(payload, x.shape))
        total += decoded
        rel.append(float((total - k * x).norm() / (k * x.norm())))
    return rel


@pytest.mark.parametrize("name", LOSSY)
def test_accumulated_error_falls_like_one_over_k(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 65, generator=gen) * torch.logspace(-2, 1, 65)  # mixed magnitudes, ragged blocks
    rel = _accumulated_rel_errors(ErrorFeedback(get_codec(name)), name, x, 64)
    assert rel[0] > 0
    for k, r in enumerate(rel, start=1):
        assert r * k <= 3 * rel[0], (k, r, rel[0])  # ||residual_k|| stays O(one quantisation error)
    assert rel[-1] <= rel[0] / 20
    # without feedback the same error repeats and never averages out
    plain = _accumulated_rel_errors(None, name, x, 16)
    assert plain[-1] >= 0.99 * plain[0]


@pytest.mark.parametrize("name", codec_names())
def test_every_codec_works_with_feedback(name: str) -> None:
    codec = get_codec(name)
    fb = ErrorFeedback(codec)
    x = torch.randn(300, 3)
    for _ in range(3):
        payload, decoded = fb.encode_with_decoded("t", x)
        assert decoded.shape == x.shape and decoded.dtype == torch.float32
        residual = fb.residual("t")
        assert residual is not None and residual.shape == x.shape and residual.dtype == torch.float32
        if codec.lossless:
            assert torch.equal(residual, torch.zeros_like(x))
            assert torch.equal(decoded, x)


def test_residual_is_input_plus_old_residual_minus_decoded() -> None:
    fb = ErrorFeedback(get_codec("int4"))
    x = torch.randn(1000)
    _, d1 = fb.encode_with_decoded("a", x)
    r1 = fb.residual("a")
    assert r1 is not None and torch.allclose(r1, x - d1, atol=0)
    r1 = r1.clone()
    _, d2 = fb.encode_with_decoded("a", x)
    assert torch.allclose(fb.residual("a"), x + r1 - d2, atol=1e-6)


def test_encode_matches_encode_with_decoded_and_names_are_independent() -> None:
    a, b = ErrorFeedback(get_codec("int8")), ErrorFeedback(get_codec("int8"))
    x, y = torch.randn(500), torch.randn(20, 20)
    for _ in range(3):
        assert a.encode("x", x) == b.encode_with_decoded("x", x)[0]
        assert a.encode("y", y) == b.encode_with_decoded("y", y)[0]
    assert fb_residual_shape(a, "y") == (20, 20)
    assert a.residual("missing") is None


def fb_residual_shape(fb: ErrorFeedback, name: str) -> tuple[int, ...]:
    r = fb.residual(name)
    assert r is not None
    return tuple(r.shape)


def test_state_dict_round_trip_continues_identically() -> None:
    codec = get_codec("int4", CodecParams(block_size=64, zstd_level=1))
    a = ErrorFeedback(codec)
    x = torch.randn(777)
    for _ in range(3):
        a.encode("w", x)
    state = a.state_dict()
    b = ErrorFeedback(codec)
    b.load_state_dict(state)
    state["w"].add_(1.0)  # the copy is the caller's; the live residual is untouched
    for _ in range(3):
        assert a.encode("w", x) == b.encode("w", x)
    with pytest.raises(ManifestMismatchError):
        b.load_state_dict({"w": torch.zeros(3, dtype=torch.int64)})


def test_reset_and_shape_mismatch() -> None:
    fb = ErrorFeedback(get_codec("int8"))
    fb.encode("w", torch.randn(10))
    fb.encode("v", torch.randn(10))
    with pytest.raises(ManifestMismatchError):
        fb.encode("w", torch.randn(11))
    fb.reset("w")
    assert fb.residual("w") is None and fb.residual("v") is not None
    fb.encode("w", torch.randn(11))
    fb.reset()
    assert fb.state_dict() == {}


def test_low_precision_input_and_no_aliasing() -> None:
    fb = ErrorFeedback(get_codec("int8"))
    x = torch.randn(256).to(torch.bfloat16)
    x_copy = x.clone()
    _, decoded = fb.encode_with_decoded("w", x)
    assert torch.equal(x, x_copy)
    assert decoded.dtype == torch.float32
    assert torch.allclose(decoded + fb.residual("w"), x.float(), atol=1e-6)
