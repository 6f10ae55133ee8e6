"""The fast step: FlexAttention and SDPA against the float64 naive ALiBi reference, gradient
accumulation against the large batch, activation checkpointing against the plain step."""

from __future__ import annotations

import copy

import pytest
import torch

from dept_model.alibi import alibi_bias, alibi_slopes
from dept_model.attention import (
    AttentionInputs,
    CausalSelfAttention,
    causal_block_mask,
    resolve_attn_impl,
)
from dept_model.config import ModelConfig, model_preset
from dept_model.train import TrainConfig, Trainer
from dept_model.variants import Variant, build_model
from tests.unit.dept_model.test_attention import naive_alibi_attention


def _flex_inputs(n_heads: int, T: int, device: str = "cpu", dtype=torch.float64) -> AttentionInputs:
    slopes = torch.tensor(alibi_slopes(n_heads), dtype=dtype, device=device)
    return AttentionInputs("flex", slopes_H=slopes, block_mask=causal_block_mask(T, torch.device(device)))


@pytest.mark.parametrize("n_heads", [4, 3])
@pytest.mark.parametrize("T", [9, 130])  # 130: more than one 128-wide block, a partial last block
def test_flex_and_sdpa_match_naive_float64(n_heads: int, T: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig(n_layers=1, d_model=8 * n_heads, n_heads=n_heads, max_seq_len=256)
    attn = CausalSelfAttention(config).double()
    B, D = 2, config.d_model
    x_BTD = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():  # FlexAttention has no backward on CPU
        sdpa = attn(x_BTD, AttentionInputs("sdpa", bias_HTT=alibi_bias(n_heads, T, dtype=torch.float64)))
        flex = attn(x_BTD, _flex_inputs(n_heads, T))
        q, k, v = attn.qkv(x_BTD).split(D, dim=-1)
        heads = lambda t: t.view(B, T, n_heads, D // n_heads).transpose(1, 2)  # noqa: E731
        y = naive_alibi_attention(heads(q), heads(k), heads(v), alibi_slopes(n_heads))
        want = attn.proj(y.transpose(1, 2).reshape(B, T, D))
    for got in (sdpa, flex):
        err = (got - want).abs().max().item()
        assert err < 1e-9, err
    assert (sdpa - flex).abs().max().item() < 1e-9


def test_body_flex_equals_sdpa_and_is_causal() -> None:
    model = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=128, seed=3).double()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.body.set_attention("sdpa")
        h_sdpa = model.hidden(ids)
        model.body.set_attention("flex")
        h_flex = model.hidden(ids)
        changed = ids.clone()
        changed[:, 30:] = (changed[:, 30:] + 1) % 128
        h_changed = model.hidden(changed)
    assert (h_sdpa - h_flex).abs().max().item() < 1e-10
    assert torch.equal(h_flex[:, :30], h_changed[:, :30])
    assert not torch.allclose(h_flex[:, 30:], h_changed[:, 30:])


def test_attn_impl_resolution_and_validation() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attn_impl("auto", cpu) == "sdpa"
    assert resolve_attn_impl("auto", cuda) == "flex"
    assert resolve_attn_impl("auto", cuda, dropout=0.1) == "sdpa"
    assert resolve_attn_impl("sdpa", cuda) == "sdpa" and resolve_attn_impl("flex", cpu) == "flex"
    with pytest.raises(ValueError, match="dropout"):
        resolve_attn_impl("flex", cuda, dropout=0.1)
    with pytest.raises(ValueError, match="one of"):
        resolve_attn_impl("flash", cpu)
    with pytest.raises(ValueError, match="attn_impl"):
        TrainConfig(warmup_steps=0, total_steps=1, attn_impl="xformers")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(warmup_steps=0, total_steps=1, grad_accum=0)


def _batch(vocab: int, B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=gen), torch.randint(0, vocab, (B, T), generator=gen)


def _max_param_diff(a: Trainer, b: Trainer) -> float:
    return max(
        (pa - pb).abs().max().item()
        for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True)
    )


def _grads(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    trainer.model.train()
    loss = float(trainer._forward_backward(x, y))
    grads = [p.grad.clone() for p in trainer.model.parameters()]  # type: ignore[union-attr]
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss, grads


@pytest.mark.parametrize("variant", [Variant.GLOB, Variant.TRIM])
@pytest.mark.parametrize("accum", [2, 3, 8])  # 3 does not divide the batch of 8: unequal micro-batches
def test_grad_accumulation_equals_large_batch(variant: Variant, accum: int) -> None:
    vocab = 96
    # TRIM: the source holds the even rows, so some targets are ignored and micro-batches score
    # different numbers of tokens; the weighting must still give the large batch's mean.
    source_ids = torch.arange(0, vocab, 2) if variant == Variant.TRIM else None
    init = build_model(model_preset("tiny"), variant, vocab_size=vocab, source_ids=source_ids, seed=5)
    big = Trainer(copy.deepcopy(init), TrainConfig(lr=3e-3, warmup_steps=1, total_steps=4))
    acc = Trainer(copy.deepcopy(init), TrainConfig(lr=3e-3, warmup_steps=1, total_steps=4, grad_accum=accum))
    for step in range(3):
        x, y = _batch(vocab, 8, 32, seed=step)
        if variant == Variant.TRIM:
            x = x // 2 * 2  # inputs must be held rows
            y[: 8 // 2] = y[: 8 // 2] // 2 * 2  # the first half scores every target, the rest about half
        # The accumulated gradient is the large batch's, to float32 rounding (sums over 256 tokens
        # in another order: a few ulp of the largest term, relative to each tensor's largest entry).
        (lb, gb), (la, ga) = _grads(big, x, y), _grads(acc, x, y)
        assert la == pytest.approx(lb, rel=1e-6)
        for g_big, g_acc in zip(gb, ga, strict=True):
            scale = g_big.abs().max().item()
            assert (g_acc - g_big).abs().max().item() <= 1e-4 * scale + 1e-12
        # And so is the optimizer step (Adam divides by sqrt(v): near-zero gradients amplify the
        # rounding, hence a bound relative to the learning rate).
        assert acc.step(x, y) == pytest.approx(big.step(x, y), rel=1e-6)
        assert _max_param_diff(big, acc) < 0.02 * 3e-3
    moved = max(
        (p - q).abs().max().item() for p, q in zip(acc.model.parameters(), init.parameters(), strict=True)
    )
    assert moved > 1e-3  # the steps did train


def test_activation_checkpointing_equals_plain_step() -> None:
    init = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=64, seed=2)
    plain = Trainer(copy.deepcopy(init), TrainConfig(lr=3e-3, warmup_steps=1, total_steps=4))
    ckpt = Trainer(
        copy.deepcopy(init),
        TrainConfig(lr=3e-3, warmup_steps=1, total_steps=4, activation_checkpointing=True),
    )
    assert ckpt.model.body.activation_checkpointing
    for step in range(2):
        x, y = _batch(64, 4, 24, seed=step)
        assert ckpt.step(x, y) == pytest.approx(plain.step(x, y), rel=1e-6)
    assert _max_param_diff(plain, ckpt) < 1e-6


@pytest.mark.gpu
def test_cuda_flex_step_matches_sdpa() -> None:
    # Eager model, compiled flex kernel; the fully compiled pair is compared by dept-bench step
    # (loss_step0_gap: the same weights and batch for every implementation).
    init = build_model(model_preset("small"), Variant.GLOB, vocab_size=512, seed=0)
    losses: dict[str, list[float]] = {}
    for impl in ("sdpa", "flex"):
        cfg = TrainConfig(lr=1e-3, warmup_steps=1, total_steps=10, attn_impl=impl)
        trainer = Trainer(copy.deepcopy(init), cfg, "cuda")
        losses[impl] = [trainer.step(*_batch(512, 4, 256, seed=s)) for s in range(4)]
    assert losses["flex"] == pytest.approx(losses["sdpa"], rel=2e-2), losses


@pytest.mark.gpu
def test_cuda_flex_forward_matches_float64_reference() -> None:
    torch.manual_seed(0)
    n_heads, T = 12, 300
    config = ModelConfig(n_layers=1, d_model=64 * n_heads, n_heads=n_heads, max_seq_len=512)
    attn = CausalSelfAttention(config).cuda()
    x = torch.randn(2, T, config.d_model, device="cuda")
    with torch.no_grad():
        want = attn.double()(
            x.double(),
            AttentionInputs("sdpa", bias_HTT=alibi_bias(n_heads, T, dtype=torch.float64, device="cuda")),
        )
        attn.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = attn(x, _flex_inputs(n_heads, T, "cuda", torch.float32))
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    assert err < 2e-2, err


@pytest.mark.gpu
def test_cuda_grad_accumulation_with_checkpointing_equals_large_batch() -> None:
    init = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=256, seed=1)
    base = dict(lr=3e-3, warmup_steps=1, total_steps=4, autocast_bf16=False, attn_impl="flex")
    big = Trainer(copy.deepcopy(init), TrainConfig(**base), "cuda")  # type: ignore[arg-type]
    acc = Trainer(
        copy.deepcopy(init),
        TrainConfig(**base, grad_accum=4, activation_checkpointing=True),  # type: ignore[arg-type]
        "cuda",
    )
    for s in range(2):
        x, y = _batch(256, 8, 128, seed=s)
        x, y = x.cuda(), y.cuda()  # the worker hands the trainer batches on its device
        (lb, gb), (la, ga) = _grads(big, x, y), _grads(acc, x, y)
        assert la == pytest.approx(lb, rel=1e-5)
        for g_big, g_acc in zip(gb, ga, strict=True):
            assert (g_acc - g_big).abs().max().item() <= 1e-4 * g_big.abs().max().item() + 1e-12
        assert acc.step(x, y) == pytest.approx(big.step(x, y), rel=1e-4)
    assert _max_param_diff(big, acc) < 0.02 * 3e-3  # Adam amplifies rounding of near-zero gradients
