"""RoundAggregate: order-independent sums, uniform or token-weighted FedAvg, TRIM rows."""

from __future__ import annotations

import itertools

import pytest
import torch

from dept_comm.names import EMB_IDS, EMB_ROWS, EMB_WEIGHT
from dept_server.aggregate import RoundAggregate, contribution_weight

SHAPES = {"body.w": (300, 200), "body.b": (200,)}


def _updates(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    # Mixed magnitudes, as deltas of different workers are: fp32 sums then depend on the order.
    return [
        {k: torch.randn(s, generator=gen) * 10.0 ** (-i - 1) for k, s in SHAPES.items()} for i in range(n)
    ]


def test_the_mean_does_not_depend_on_the_order_of_commits() -> None:
    updates = _updates(4)
    means = []
    for order in itertools.permutations(range(4)):
        agg = RoundAggregate(SHAPES, trim_rows=None)
        for i in order:
            agg.fold(updates[i], num_tokens=100)
        means.append(agg.mean())
    for m in means[1:]:
        assert all(torch.equal(m[k], means[0][k]) for k in SHAPES)
    # The test can fail: plain fp32 running sums do differ between these orders.
    fp32 = set()
    for order in itertools.permutations(range(4)):
        acc = torch.zeros(SHAPES["body.w"])
        for i in order:
            acc += updates[i]["body.w"]
        fp32.add((acc / 4).numpy().tobytes())
    assert len(fp32) > 1
    assert torch.allclose(means[0]["body.w"], sum(u["body.w"] for u in updates) / 4, atol=1e-7)


def test_token_weighting_gives_the_weighted_mean() -> None:
    updates = _updates(2)
    agg = RoundAggregate(SHAPES, trim_rows=None, weighting="tokens")
    agg.fold(updates[0], num_tokens=1000)
    agg.fold(updates[1], num_tokens=3000)
    want = ((updates[0]["body.w"].double() * 1000 + updates[1]["body.w"].double() * 3000) / 4000).float()
    assert torch.equal(agg.mean()["body.w"], want)
    uniform = RoundAggregate(SHAPES, trim_rows=None)
    for u in updates:
        uniform.fold(u, num_tokens=1000)
    assert not torch.equal(uniform.mean()["body.w"], want)


def test_trim_rows_are_averaged_over_the_sources_that_have_them_with_token_weights() -> None:
    agg = RoundAggregate({"body.b": (2,), EMB_WEIGHT: (6, 3)}, trim_rows=(6, 3), weighting="tokens")
    a = {"body.b": torch.zeros(2), EMB_IDS: torch.tensor([0, 2]), EMB_ROWS: torch.ones(2, 3)}
    b = {"body.b": torch.zeros(2), EMB_IDS: torch.tensor([2, 5]), EMB_ROWS: torch.full((2, 3), 5.0)}
    agg.fold(a, num_tokens=1)
    agg.fold(b, num_tokens=3)
    emb = agg.mean()[EMB_WEIGHT]
    assert torch.equal(emb[0], torch.ones(3))  # only a has row 0
    assert torch.equal(emb[2], torch.full((3,), (1 * 1.0 + 3 * 5.0) / 4))
    assert torch.equal(emb[5], torch.full((3,), 5.0))
    assert torch.equal(emb[[1, 3, 4]], torch.zeros(3, 3))  # nobody's rows stay unchanged


def test_weights_and_their_errors() -> None:
    assert contribution_weight("uniform", 0) == 1.0
    assert contribution_weight("tokens", 512) == 512.0
    with pytest.raises(ValueError, match="num_tokens"):
        contribution_weight("tokens", 0)
    with pytest.raises(ValueError, match="uniform"):
        RoundAggregate(SHAPES, trim_rows=None, weighting="median")
