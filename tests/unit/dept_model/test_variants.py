"""Variant enum and builders, temperature sampling and the STD mixture."""

from __future__ import annotations

import pytest
import torch

from dept_model.config import model_preset
from dept_model.embeddings import GlobalEmbeddings, SpecEmbeddings, TrimEmbeddings
from dept_model.variants import (
    MixtureBatches,
    Variant,
    build_model,
    shares_embeddings,
    temperature_weights,
    uses_global_vocab,
)


def test_variants_build_the_right_embeddings():
    cfg = model_preset("tiny")
    ids = torch.tensor([1, 4, 6])
    assert isinstance(build_model(cfg, Variant.GLOB, vocab_size=10, seed=0).embeddings, GlobalEmbeddings)
    assert isinstance(build_model(cfg, "std", vocab_size=10, seed=0).embeddings, GlobalEmbeddings)
    trim = build_model(cfg, Variant.TRIM, vocab_size=10, source_ids=ids, seed=0).embeddings
    assert isinstance(trim, TrimEmbeddings) and trim.num_rows == 3
    for v in (Variant.SPEC, Variant.SPEC_OPT):
        assert isinstance(build_model(cfg, v, vocab_size=10, seed=0).embeddings, SpecEmbeddings)
    with pytest.raises(ValueError):
        build_model(cfg, Variant.TRIM, vocab_size=10, seed=0)
    with pytest.raises(ValueError):
        build_model(cfg, Variant.GLOB, vocab_size=10, source_ids=ids, seed=0)
    assert [v.value for v in Variant] == ["glob", "trim", "spec", "spec-opt", "std"]
    assert [shares_embeddings(v) for v in Variant] == [True, True, False, False, True]
    assert not uses_global_vocab(Variant.SPEC_OPT) and uses_global_vocab(Variant.SPEC)


def test_same_seed_same_body_across_variants():
    cfg = model_preset("tiny")
    a = build_model(cfg, Variant.SPEC, vocab_size=10, seed=4).body_state()
    b = build_model(cfg, Variant.GLOB, vocab_size=99, seed=4).body_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_temperature_weights():
    assert temperature_weights([100, 300], 1.0) == pytest.approx([0.25, 0.75])
    assert temperature_weights([100, 400], 2.0) == pytest.approx([1 / 3, 2 / 3])  # sqrt
    assert temperature_weights([1, 10**6], 1e6) == pytest.approx([0.5, 0.5], abs=1e-4)
    with pytest.raises(ValueError):
        temperature_weights([1, 2], 0.0)
    with pytest.raises(ValueError):
        temperature_weights([], 1.0)
    with pytest.raises(ValueError):
        temperature_weights([0, 2], 1.0)


class _Counter:
    def __init__(self, tag):
        self.tag, self.n = tag, 0

    def next_batch(self):
        self.n += 1
        return torch.full((1, 2), self.tag), torch.full((1, 2), self.n)

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_mixture_follows_weights_and_resumes():
    mix = MixtureBatches([_Counter(0), _Counter(1), _Counter(2)], [0.2, 0.8, 0.0], seed=1)
    tags = [int(mix.next_batch()[0][0, 0]) for _ in range(2000)]
    assert tags.count(2) == 0
    assert 0.75 < tags.count(1) / 2000 < 0.85
    state = mix.state_dict()
    ahead = [(int(x[0, 0]), int(y[0, 0])) for x, y in (mix.next_batch() for _ in range(20))]
    other = MixtureBatches([_Counter(0), _Counter(1), _Counter(2)], [0.2, 0.8, 0.0], seed=99)
    other.load_state_dict(state)
    assert [(int(x[0, 0]), int(y[0, 0])) for x, y in (other.next_batch() for _ in range(20))] == ahead
    with pytest.raises(ValueError):
        MixtureBatches([_Counter(0)], [0.5, 0.5], seed=0)
