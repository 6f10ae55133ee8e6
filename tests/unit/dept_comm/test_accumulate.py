"""Accumulators: dense mean equals the stacked mean; TRIM rows average only over sources having them."""

from __future__ import annotations

import pytest
import torch

from dept_comm.accumulate import DenseAccumulator, RowAccumulator, fold_in_key_order
from dept_comm.errors import ConflictError, InvalidInputError, ManifestMismatchError, NonFiniteError

SHAPES = {"w": (3, 4), "b": (4,)}


def _updates(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen) for k, s in SHAPES.items()} for _ in range(n)]


def test_dense_mean_equals_stacked_mean() -> None:
    ups = _updates(5)
    acc = DenseAccumulator(SHAPES)
    for u in ups:
        for k, v in u.items():
            acc.add(k, v)
    mean = acc.mean()
    assert acc.contributors == 5
    for k in SHAPES:
        assert torch.allclose(mean[k], torch.stack([u[k] for u in ups]).mean(0), atol=1e-6)
        assert mean[k].dtype == torch.float32


def test_dense_weighted_mean_and_bf16_input() -> None:
    ups = _updates(3, seed=1)
    weights = [1.0, 2.0, 5.0]
    acc = DenseAccumulator(SHAPES)
    for u, w in zip(ups, weights, strict=True):
        acc.add_all({k: v.to(torch.bfloat16) for k, v in u.items()}, weight=w)
    expected = sum(w * u["w"].to(torch.bfloat16).float() for u, w in zip(ups, weights, strict=True)) / 8.0
    assert torch.allclose(acc.mean()["w"], expected, atol=1e-6)


def test_dense_mean_only_for_tensors_with_contributions() -> None:
    acc = DenseAccumulator(SHAPES)
    acc.add("b", torch.ones(4))
    acc.add("b", torch.zeros(4))
    assert set(acc.mean()) == {"b"}
    assert torch.equal(acc.mean()["b"], torch.full((4,), 0.5))
    assert acc.count("b") == 2 and acc.count("w") == 0
    acc.reset()
    assert acc.mean() == {} and acc.contributors == 0


def test_dense_rejects_bad_input_and_add_all_is_all_or_nothing() -> None:
    acc = DenseAccumulator(SHAPES)
    with pytest.raises(ManifestMismatchError, match="shape"):
        acc.add("w", torch.zeros(4, 3))
    with pytest.raises(ManifestMismatchError, match="manifest"):
        acc.add("nope", torch.zeros(1))
    with pytest.raises(InvalidInputError, match="weight"):
        acc.add("b", torch.zeros(4), weight=0.0)
    with pytest.raises(InvalidInputError, match="floating"):
        acc.add("b", torch.zeros(4, dtype=torch.int64))
    bad = {"w": torch.ones(3, 4), "b": torch.tensor([1.0, float("inf"), 0.0, 0.0])}
    with pytest.raises(NonFiniteError):
        acc.add_all(bad)
    assert acc.mean() == {} and acc.contributors == 0  # "w" was not folded either


def test_dense_same_order_is_bit_identical_and_fold_in_key_order_sorts() -> None:
    ups = _updates(6, seed=3)
    keyed = [(f"worker-{i}", u) for i, u in enumerate(ups)]

    def run(items: list[tuple[str, dict[str, torch.Tensor]]]) -> tuple[list[str], dict[str, torch.Tensor]]:
        acc = DenseAccumulator(SHAPES)
        order = fold_in_key_order(items, acc.add_all)
        return order, acc.mean()

    order_a, mean_a = run(keyed)
    order_b, mean_b = run(list(reversed(keyed)))
    assert order_a == order_b == sorted(k for k, _ in keyed)
    for k in SHAPES:
        assert torch.equal(mean_a[k], mean_b[k])  # arrival order no longer matters
    with pytest.raises(ConflictError, match="worker-0"):
        fold_in_key_order([("worker-0", 1), ("worker-0", 2)], lambda _: None)


def test_fold_in_key_order_accepts_thunks() -> None:
    decoded: list[str] = []

    def thunk(key: str) -> object:
        def decode() -> dict[str, torch.Tensor]:
            decoded.append(key)
            return {"b": torch.ones(4)}

        return decode

    acc = DenseAccumulator(SHAPES)
    fold_in_key_order([("b", thunk("b")), ("a", thunk("a"))], lambda f: acc.add_all(f()))  # type: ignore[operator]
    assert decoded == ["a", "b"] and acc.count("b") == 2


def test_row_mean_only_over_sources_having_the_row() -> None:
    acc = RowAccumulator(num_rows=10, dim=2)
    acc.add(torch.tensor([0, 3, 5]), torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    acc.add(torch.tensor([5, 3, 7]), torch.tensor([[5.0, 5.0], [4.0, 4.0], [9.0, 9.0]]))
    ids, rows = acc.mean_rows()
    assert ids.tolist() == [0, 3, 5, 7]  # rows 1, 2, 4, 6, 8, 9: nobody had them, not returned
    assert rows.tolist() == [[1.0, 1.0], [3.0, 3.0], [4.0, 4.0], [9.0, 9.0]]
    assert acc.row_counts().tolist() == [1, 0, 0, 2, 0, 2, 0, 1, 0, 0]
    assert acc.contributors == 2


def test_row_mean_matches_reference_masked_mean() -> None:
    gen = torch.Generator().manual_seed(4)
    num_rows, dim = 50, 3
    table = torch.zeros(3, num_rows, dim)
    mask = torch.zeros(3, num_rows, dtype=torch.bool)
    acc = RowAccumulator(num_rows, dim)
    for s in range(3):
        ids = torch.randperm(num_rows, generator=gen)[:20]
        rows = torch.randn(20, dim, generator=gen)
        table[s, ids] = rows
        mask[s, ids] = True
        acc.add(ids, rows)
    ids, rows = acc.mean_rows()
    have = mask.any(0)
    assert ids.tolist() == torch.nonzero(have).flatten().tolist()
    ref = table.sum(0)[have] / mask.sum(0)[have].unsqueeze(1)
    assert torch.allclose(rows, ref, atol=1e-6)


def test_row_accumulator_rejects_bad_ids() -> None:
    acc = RowAccumulator(num_rows=4, dim=2)
    with pytest.raises(InvalidInputError, match="range"):
        acc.add(torch.tensor([0, 4]), torch.zeros(2, 2))
    with pytest.raises(InvalidInputError, match="range"):
        acc.add(torch.tensor([-1]), torch.zeros(1, 2))
    with pytest.raises(InvalidInputError, match="unique"):
        acc.add(torch.tensor([1, 1]), torch.zeros(2, 2))
    with pytest.raises(InvalidInputError, match="int64"):
        acc.add(torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2, 2))
    with pytest.raises(ManifestMismatchError):
        acc.add(torch.tensor([1, 2]), torch.zeros(2, 3))
    with pytest.raises(NonFiniteError):
        acc.add(torch.tensor([1]), torch.tensor([[float("nan"), 0.0]]))
    assert acc.contributors == 0
    ids, rows = acc.mean_rows()
    assert ids.numel() == 0 and rows.shape == (0, 2)
    acc.add(torch.tensor([2]), torch.ones(1, 2), weight=3.0)
    acc.reset()
    assert acc.mean_rows()[0].numel() == 0 and acc.contributors == 0
