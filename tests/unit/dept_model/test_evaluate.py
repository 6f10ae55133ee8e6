"""evaluate(): loss, perplexity and bits per byte against direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from dept_model.config import model_preset
from dept_model.evaluate import evaluate
from dept_model.variants import Variant, build_model


def test_matches_direct_computation():
    torch.manual_seed(0)
    model = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=40, seed=0)
    batches = [(torch.randint(0, 40, (2, 12)), torch.randint(0, 40, (2, 12))) for _ in range(3)]
    lengths = torch.randint(1, 5, (40,))
    model.train()
    got = evaluate(model, batches, lengths)
    assert model.training  # mode restored
    with torch.no_grad():
        nll = sum(
            F.cross_entropy(model(x).reshape(-1, 40), y.reshape(-1), reduction="sum") for x, y in batches
        )
    nbytes = sum(int(lengths[y].sum()) for _, y in batches)
    assert got["tokens"] == 72 and got["ignored_tokens"] == 0
    assert got["loss"] == pytest.approx(nll.item() / 72, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-9)
    assert got["bits_per_byte"] == pytest.approx(nll.item() / (math.log(2) * nbytes), rel=1e-5)
    assert math.isnan(evaluate(model, batches)["bits_per_byte"])


def test_trim_counts_ignored_targets():
    ids = torch.tensor([0, 1, 2, 3])
    model = build_model(model_preset("tiny"), Variant.TRIM, vocab_size=10, source_ids=ids, seed=0)
    x = torch.tensor([[0, 1, 2, 3]])
    y = torch.tensor([[1, 2, 9, 3]])
    out = evaluate(model, [(x, y)], torch.ones(10, dtype=torch.long))
    assert out["tokens"] == 3 and out["ignored_tokens"] == 1
    with pytest.raises(ValueError):
        evaluate(model, [(x, torch.tensor([[9, 9, 9, 9]]))])
