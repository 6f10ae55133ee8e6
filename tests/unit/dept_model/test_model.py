"""Body/embedding split: parameter counts, disjoint groups, body state, reference equivalence."""

from __future__ import annotations

import pytest
import torch

from dept_model.config import ModelConfig, model_preset
from dept_model.model import Body
from dept_model.reference import reference_from
from dept_model.train import TrainConfig, Trainer
from dept_model.variants import Variant, build_model


def test_body_parameter_count_125m():
    L, D = 12, 768
    F = 4 * D
    # per block: 2 LayerNorm gains (no bias) + qkv (3 D^2) + out proj (D^2) + fc1 (D F) + fc2 (F D)
    per_block = 2 * D + 3 * D * D + D * D + D * F + F * D
    expected = L * per_block + D  # + final norm gain
    assert expected == 84_953_856
    body = Body(model_preset("125m"))
    assert sum(p.numel() for p in body.parameters()) == expected


@pytest.mark.parametrize("variant", list(Variant))
def test_parameter_groups_disjoint_and_cover(variant):
    ids = torch.tensor([0, 2, 5, 9]) if variant is Variant.TRIM else None
    model = build_model(model_preset("tiny"), variant, vocab_size=10, source_ids=ids, seed=0)
    body = {id(p) for p in model.body_parameters()}
    emb = {id(p) for p in model.embedding_parameters()}
    assert body and emb and not body & emb
    assert body | emb == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("variant", [Variant.SPEC, Variant.SPEC_OPT])
def test_spec_embeddings_never_in_body_state(variant):
    model = build_model(model_preset("tiny"), variant, vocab_size=37, seed=0)
    state = model.body_state()
    assert state.keys() == model.body.state_dict().keys()
    assert all(k.startswith(("blocks.", "norm_f.")) for k in state)
    assert "blocks.0.attn.qkv.weight" in state and "norm_f.weight" in state
    emb = model.embeddings.weight
    assert all(t.shape[0] != emb.shape[0] for t in state.values())
    assert all(t.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr() for t in state.values())
    assert not any(torch.equal(t, emb) for t in state.values() if t.shape == emb.shape)


def test_load_body_state_keeps_parameters_and_optimizer_state():
    torch.manual_seed(0)
    model = build_model(model_preset("tiny"), Variant.SPEC, vocab_size=50, seed=0)
    trainer = Trainer(model, TrainConfig(warmup_steps=1, total_steps=10))
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    trainer.step(x, y)
    params_before = [id(p) for p in model.body_parameters()]
    p0 = model.body_parameters()[0]
    moment = trainer.optimizer.state[p0]["exp_avg"].clone()
    new_body = build_model(model_preset("tiny"), Variant.SPEC, vocab_size=50, seed=9).body_state()
    model.load_body_state(new_body)
    assert [id(p) for p in model.body_parameters()] == params_before
    assert torch.equal(model.body_state()["blocks.0.attn.qkv.weight"], new_body["blocks.0.attn.qkv.weight"])
    assert torch.equal(trainer.optimizer.state[p0]["exp_avg"], moment)
    trainer.step(x, y)  # continues with the kept moments
    with pytest.raises(ValueError, match="missing"):
        model.load_body_state({k: v for k, v in new_body.items() if k != "norm_f.weight"})
    bad = dict(new_body)
    bad["norm_f.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="shape"):
        model.load_body_state(bad)


def test_matches_reference_model():
    torch.manual_seed(0)
    config = ModelConfig(n_layers=2, d_model=48, n_heads=3, max_seq_len=32, bias=True)
    model = build_model(config, Variant.GLOB, vocab_size=97, seed=4)
    ref = reference_from(model)
    x, y = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    assert model(x, y).item() == pytest.approx(ref(x, y).item(), rel=1e-5)


def test_config_validation_and_presets():
    assert model_preset("tiny").d_ff == 4 * model_preset("tiny").d_model
    assert model_preset("1.3b").d_model == 2048 and model_preset("350m").n_layers == 24
    cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, max_seq_len=4, d_ff=5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        model_preset("7b")
    with pytest.raises(ValueError):
        ModelConfig(n_layers=1, d_model=10, n_heads=3, max_seq_len=4)
    with pytest.raises(ValueError):
        ModelConfig(n_layers=0, d_model=8, n_heads=2, max_seq_len=4)
    with pytest.raises(ValueError):
        ModelConfig(n_layers=1, d_model=8, n_heads=2, max_seq_len=4, norm="batchnorm")
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": 3})
    rms = build_model(
        ModelConfig(n_layers=1, d_model=8, n_heads=2, max_seq_len=4, norm="rmsnorm"),
        Variant.GLOB,
        vocab_size=5,
        seed=0,
    )
    assert torch.isfinite(rms(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)))
