"""ALiBi attention against a float64 naive reference, causality and the slope table."""

from __future__ import annotations

import math

import pytest
import torch

from dept_model.alibi import AlibiCache, alibi_bias, alibi_slopes
from dept_model.attention import CausalSelfAttention
from dept_model.config import ModelConfig
from dept_model.model import Body
from dept_model.reference import reference_slopes


def naive_alibi_attention(q_BHTE, k_BHTE, v_BHTE, slopes):
    """Explicit loops: softmax over j <= i of q_i.k_j / sqrt(E) + slope * (j - i)."""
    B, H, T, E = q_BHTE.shape
    out = torch.zeros_like(q_BHTE)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                scores = torch.full((T,), -math.inf, dtype=q_BHTE.dtype)
                for j in range(i + 1):
                    scores[j] = q_BHTE[b, h, i] @ k_BHTE[b, h, j] / math.sqrt(E) + slopes[h] * (j - i)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[b, h, i] = weights @ v_BHTE[b, h]
    return out


@pytest.mark.parametrize("n_heads", [4, 3])
def test_attention_matches_naive_float64(n_heads):
    torch.manual_seed(0)
    config = ModelConfig(n_layers=1, d_model=8 * n_heads, n_heads=n_heads, max_seq_len=16)
    attn = CausalSelfAttention(config).double()
    B, T, D = 2, 9, config.d_model
    x_BTD = torch.randn(B, T, D, dtype=torch.float64)
    bias = alibi_bias(n_heads, T, dtype=torch.float64)
    got = attn(x_BTD, bias)

    q, k, v = attn.qkv(x_BTD).split(D, dim=-1)
    heads = lambda t: t.view(B, T, n_heads, D // n_heads).transpose(1, 2)  # noqa: E731
    y = naive_alibi_attention(heads(q), heads(k), heads(v), alibi_slopes(n_heads))
    want = attn.proj(y.transpose(1, 2).reshape(B, T, D))
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()


def test_body_is_causal():
    torch.manual_seed(0)
    config = ModelConfig(n_layers=2, d_model=32, n_heads=4, max_seq_len=16)
    body = Body(config, seed=0).double()
    h = torch.randn(1, 12, 32, dtype=torch.float64)
    changed = h.clone()
    changed[:, 7:] = torch.randn(1, 5, 32, dtype=torch.float64)
    a, b = body(h), body(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-12, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_slopes_power_of_two_and_extension():
    assert alibi_slopes(8) == pytest.approx([2.0 ** (-h) for h in range(1, 9)])
    assert alibi_slopes(4) == pytest.approx([2.0 ** (-2 * h) for h in range(1, 5)])
    # 12 heads: the 8-head slopes, then the odd ones of the 16-head table.
    assert alibi_slopes(12) == pytest.approx(
        [2.0 ** (-h) for h in range(1, 9)] + [2.0 ** (-h / 2) for h in (1, 3, 5, 7)]
    )
    for n in range(1, 33):
        assert alibi_slopes(n) == pytest.approx(reference_slopes(n), rel=1e-12)
    with pytest.raises(ValueError):
        alibi_slopes(0)


def test_bias_values_and_cache():
    bias = alibi_bias(2, 4)
    assert bias.shape == (2, 4, 4)
    assert bias[0, 3, 1].item() == pytest.approx(2.0**-4 * (1 - 3))
    assert torch.isinf(bias[1, 0, 1]) and bias[1, 0, 1] < 0
    assert torch.all(torch.diagonal(bias, dim1=1, dim2=2) == 0)
    cache = AlibiCache(2, max_entries=2)
    first = cache.get(4, torch.device("cpu"), torch.float32)
    assert cache.get(4, torch.device("cpu"), torch.float32) is first
    assert torch.equal(first, bias)
    cache.get(5, torch.device("cpu"), torch.float32)
    cache.get(6, torch.device("cpu"), torch.float32)
    assert cache.get(4, torch.device("cpu"), torch.float32) is not first  # evicted, rebuilt
