"""Trainer: schedule, parameter groups, resumable state, convergence on a real source, CUDA path."""

from __future__ import annotations

import math

import pytest
import torch

from dept_model.config import model_preset
from dept_model.evaluate import evaluate
from dept_model.train import TrainConfig, Trainer, lr_at, param_groups
from dept_model.variants import Variant, build_model


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(1000, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_train_config_validation():
    with pytest.raises(ValueError):
        TrainConfig(warmup_steps=5, total_steps=4)
    with pytest.raises(ValueError):
        TrainConfig(warmup_steps=0, total_steps=4, lr=0)
    with pytest.raises(ValueError):
        TrainConfig(warmup_steps=0, total_steps=4, betas=(0.9, 1.0))
    with pytest.raises(TypeError):
        TrainConfig()  # warmup_steps and total_steps are required


def test_weight_decay_only_on_body_matrices():
    model = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=20, seed=0)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert groups["body_decay"]["weight_decay"] == 0.1
    assert all(p.dim() == 2 for p in groups["body_decay"]["params"])
    assert groups["body_no_decay"]["weight_decay"] == 0.0 and groups["embeddings"]["weight_decay"] == 0.0
    assert groups["embeddings"]["params"][0] is model.embeddings.weight


def _batches(vocab, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (2, 16), generator=gen), torch.randint(0, vocab, (2, 16), generator=gen))
        for _ in range(n)
    ]


def test_trainer_matches_reference_step():
    from dept_model.reference import ReferenceTrainer, reference_from

    cfg = TrainConfig(lr=3e-3, warmup_steps=2, total_steps=6)
    model = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=64, seed=1)
    ref = ReferenceTrainer(reference_from(model), cfg)
    trainer = Trainer(model, TrainConfig(lr=3e-3, warmup_steps=2, total_steps=6, loss_chunk_tokens=7))
    for x, y in _batches(64, 5):
        assert trainer.step(x, y) == pytest.approx(ref.step(x, y), abs=1e-5)


@pytest.mark.parametrize("variant", [Variant.SPEC, Variant.TRIM])
def test_state_round_trip_continues_identically(tmp_path, variant):
    vocab = 64
    ids = torch.arange(0, vocab, 2) if variant is Variant.TRIM else None
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, total_steps=10)
    batches = [
        (ids[x % len(ids)], ids[y % len(ids)]) if ids is not None else (x, y) for x, y in _batches(vocab, 6)
    ]

    def fresh():
        model = build_model(model_preset("tiny"), variant, vocab_size=vocab, source_ids=ids, seed=3)
        return Trainer(model, cfg)

    a = fresh()
    for x, y in batches[:2]:
        a.step(x, y)
    a.save(tmp_path / "state.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]  # no temp file left
    with open(tmp_path / "state.safetensors", "rb") as fh:
        assert fh.read(9)[8:9] == b"{"  # safetensors: u64 header length, then a JSON header
    straight = [a.step(x, y) for x, y in batches[2:4]]

    b = fresh()
    b.load(tmp_path / "state.safetensors")
    assert b.step_count == 2
    resumed = [b.step(x, y) for x, y in batches[2:4]]
    assert resumed == straight
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.slow
def test_loss_falls_on_real_source():
    """200 CPU steps of the tiny model on the embedded English source cut validation loss >= 30%."""
    from dept_model.data import eval_batches, load_texts, tokenize_texts
    from dept_model.data.packing import TokenBatches
    from dept_model.tokenizer import token_byte_lengths, train_tokenizer

    torch.manual_seed(0)
    train_texts = load_texts("en", "train")
    tok = train_tokenizer(train_texts, vocab_size=512)
    train_ids = tokenize_texts(tok, train_texts)
    val_ids = tokenize_texts(tok, load_texts("en", "validation"))
    vocab = tok.get_vocab_size()
    model = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=vocab, seed=0)
    lengths = token_byte_lengths(tok)

    def val():
        return evaluate(model, eval_batches(val_ids, seq_len=64, batch_size=16, max_batches=4), lengths)

    before = val()
    assert before["loss"] == pytest.approx(math.log(vocab), rel=0.05)  # near-uniform at init
    trainer = Trainer(model, TrainConfig(lr=5e-3, warmup_steps=20, total_steps=200))
    batches = TokenBatches(train_ids, seq_len=64, batch_size=16, seed=0)
    for _ in range(200):
        trainer.step(*batches.next_batch())
    after = val()
    assert after["loss"] <= 0.7 * before["loss"], (before, after)
    assert after["bits_per_byte"] < before["bits_per_byte"]


@pytest.mark.gpu
def test_cuda_step_matches_cpu_math():
    cfg = TrainConfig(lr=3e-3, warmup_steps=1, total_steps=10, compile=True)
    cpu_model = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=512, seed=0)
    gpu_model = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=512, seed=0)
    cpu = Trainer(cpu_model, TrainConfig(lr=3e-3, warmup_steps=1, total_steps=10))
    gpu = Trainer(gpu_model, cfg, "cuda")
    assert gpu.autocast and gpu.optimizer.defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randint(0, 512, (4, 64), generator=gen), torch.randint(0, 512, (4, 64), generator=gen)
        lc, lg = cpu.step(x, y), gpu.step(x, y)
        assert lg == pytest.approx(lc, rel=2e-2)  # bf16 autocast against fp32
    ev = evaluate(gpu_model, [(x, y)])
    assert ev["loss"] == pytest.approx(evaluate(cpu_model, [(x, y)])["loss"], rel=2e-2)
