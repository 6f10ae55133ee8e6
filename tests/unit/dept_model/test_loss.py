"""Chunked cross-entropy equals F.cross_entropy in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from dept_model.loss import IGNORE_INDEX, chunked_cross_entropy


def _inputs(n, v, d, seed=0, ignore_every=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        t[::ignore_every] = IGNORE_INDEX
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_every", [0, 3])
def test_matches_full_cross_entropy(chunk, reduction, ignore_every):
    h, w, t = _inputs(37, 11, 5, ignore_every=ignore_every)
    got = chunked_cross_entropy(h, w, t, chunk_tokens=chunk, reduction=reduction)
    got.backward(torch.tensor(1.7, dtype=torch.float32))
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.cross_entropy(h @ w.T, t, reduction=reduction, ignore_index=IGNORE_INDEX)
    (want * 1.7).backward()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(gw, w.grad, atol=1e-6, rtol=1e-5)


def test_float32_and_partial_grad():
    h, w, t = _inputs(50, 64, 8, seed=1)
    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().float()  # no grad for the weight: only grad_h is produced
    got = chunked_cross_entropy(h32, w32, t, chunk_tokens=16)
    got.backward()
    h_ref = h.detach().float().requires_grad_()
    F.cross_entropy(h_ref @ w32.T, t).backward()
    assert torch.allclose(h32.grad, h_ref.grad, atol=1e-6)
    assert w32.grad is None


def test_no_grad_path_and_all_ignored():
    h, w, t = _inputs(20, 9, 4, seed=2)
    with torch.no_grad():
        got = chunked_cross_entropy(h, w, t, chunk_tokens=6)
        want = F.cross_entropy(h @ w.T, t)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    all_ignored = torch.full_like(t, IGNORE_INDEX)
    assert math.isnan(chunked_cross_entropy(h, w, all_ignored).item())


def test_rejects_bad_arguments():
    h, w, t = _inputs(4, 3, 2)
    with pytest.raises(ValueError):
        chunked_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError):
        chunked_cross_entropy(h, w, t, chunk_tokens=0)
    with pytest.raises(ValueError):
        chunked_cross_entropy(h, w[:, :1], t)
