"""RoundAggregate: float32 sums folded in worker-id order whatever the commit order, uniform or
token-weighted FedAvg, TRIM rows."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from dept_comm.names import EMB_IDS, EMB_ROWS, EMB_WEIGHT
from dept_comm.server.aggregate import RoundAggregate, contribution_weight

SHAPES = {"body.w": (300, 200), "body.b": (200,)}


def _updates(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    # Mixed magnitudes, as deltas of different workers are: fp32 sums then depend on the order.
    return [
        {k: torch.randn(s, generator=gen) * 10.0 ** (-i - 1) for k, s in SHAPES.items()} for i in range(n)
    ]


class Staged:
    """A committed upload as the aggregate sees it: tensors decoded when folded, discardable."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.decoded = 0
        self.discarded = False

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.decoded += 1
        for name, t in self.tensors.items():
            yield name, t.clone()

    def discard(self) -> None:
        self.discarded = True


KEYS = ["w-0a", "w-3f", "w-77", "w-c2"]  # worker ids, in the canonical (sorted) order


def _round(updates: list[dict[str, torch.Tensor]], order: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Commits arrive in ``order``; each is submitted and whatever is ready is folded, as the server does."""
    agg = RoundAggregate(SHAPES)
    for i in order:
        agg.submit(KEYS[i], Staged(updates[i]), num_tokens=100)
        agg.fold_ready(KEYS)
    assert agg.queued == 0  # every member committed: nothing waits for the close
    return dict(agg.take_means())


def test_the_mean_does_not_depend_on_the_order_of_commits() -> None:
    updates = _updates(4)
    means = [_round(updates, order) for order in itertools.permutations(range(4))]
    for m in means[1:]:
        assert all(torch.equal(m[k], means[0][k]) for k in SHAPES)
    assert all(m.dtype == torch.float32 for m in means[0].values())  # the sums are one body, not two
    # It is the fp32 sum in key order ...
    acc = updates[0]["body.w"].clone()
    for u in updates[1:]:
        acc.add_(u["body.w"])
    assert torch.equal(means[0]["body.w"], acc / 4)
    # ... and the test can fail: plain fp32 running sums do differ between these orders.
    fp32 = set()
    for order in itertools.permutations(range(4)):
        acc = torch.zeros(SHAPES["body.w"])
        for i in order:
            acc += updates[i]["body.w"]
        fp32.add((acc / 4).numpy().tobytes())
    assert len(fp32) > 1
    assert torch.allclose(means[0]["body.w"], sum(u["body.w"] for u in updates) / 4, atol=1e-7)


def test_a_commit_waits_encoded_while_a_member_before_it_has_not_committed() -> None:
    updates = _updates(3)
    staged = [Staged(u) for u in updates]
    agg = RoundAggregate(SHAPES)
    members = KEYS[:3]
    agg.submit(KEYS[2], staged[2], num_tokens=1)
    assert agg.fold_ready(members) == 0 and staged[2].decoded == 0 and agg.queued == 1
    agg.submit(KEYS[0], staged[0], num_tokens=1)
    assert agg.fold_ready(members) == 1 and staged[0].decoded == 1 and agg.queued == 1
    agg.submit(KEYS[1], staged[1], num_tokens=1)
    assert agg.fold_ready(members) == 2 and agg.queued == 0
    assert [s.decoded for s in staged] == [1, 1, 1]
    with pytest.raises(ValueError, match="already contributed"):
        agg.submit(KEYS[1], Staged(updates[1]), num_tokens=1)


def test_the_close_folds_what_waits_for_a_member_that_never_committed() -> None:
    updates = _updates(3)
    agg = RoundAggregate(SHAPES)
    for i in (2, 1):  # KEYS[0] is a member that died before committing
        agg.submit(KEYS[i], Staged(updates[i]), num_tokens=1)
        assert agg.fold_ready(KEYS[:3]) == 0
    means = dict(agg.take_means())
    want = updates[1]["body.w"].clone().add_(updates[2]["body.w"]) / 2
    assert torch.equal(means["body.w"], want) and agg.queued == 0 and agg.num_contributions == 0


def test_reset_discards_the_uploads_still_waiting() -> None:
    agg = RoundAggregate(SHAPES)
    waiting = Staged(_updates(1)[0])
    agg.submit(KEYS[1], waiting, num_tokens=1)
    agg.fold_ready(KEYS)
    agg.reset()  # the round was abandoned
    assert waiting.discarded and waiting.decoded == 0 and agg.queued == 0


def test_token_weighting_gives_the_weighted_mean() -> None:
    updates = _updates(2)
    agg = RoundAggregate(SHAPES, weighting="tokens")
    agg.fold(updates[0], num_tokens=1000)
    agg.fold(updates[1], num_tokens=3000)
    want = (updates[0]["body.w"] * 1000).add_(updates[1]["body.w"], alpha=3000) / 4000
    assert torch.equal(agg.mean()["body.w"], want)
    uniform = RoundAggregate(SHAPES)
    for u in updates:
        uniform.fold(u, num_tokens=1000)
    assert not torch.equal(uniform.mean()["body.w"], want)


def test_trim_rows_are_averaged_over_the_sources_that_have_them_with_token_weights() -> None:
    agg = RoundAggregate({"body.b": (2,), EMB_WEIGHT: (6, 3)}, row_subset=EMB_WEIGHT, weighting="tokens")
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
        RoundAggregate(SHAPES, weighting="median")
