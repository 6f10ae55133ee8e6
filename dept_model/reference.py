"""A deliberately plain twin of the model and step (explicit attention, full logits, per-tensor AdamW), for tests and benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 (the universal PyTorch alias)
from torch import nn

from dept_model.config import ModelConfig
from dept_model.model import Block, DeptModel
from dept_model.train import TrainConfig, lr_at

# Shapes: B batch, T sequence, D model width, H heads, E head width, V vocabulary.


def reference_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes written out as in the ALiBi paper's code (geometric sequence from 2^(-8/n))."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + reference_slopes(2 * closest)[0::2][: num_heads - closest]


def _norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class ReferenceBlock(nn.Module):
    """Pre-norm block with separate q, k, v projections and attention computed by hand."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f, b = config.d_model, config.d_ff, config.bias
        self.n_heads = config.n_heads
        self.ln1, self.ln2 = _norm(config), _norm(config)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=b) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, f, bias=b), nn.Linear(f, d, bias=b)

    def forward(self, x_BTD: torch.Tensor, mask_HTT: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        H, E = self.n_heads, D // self.n_heads
        h_BTD = self.ln1(x_BTD)
        q_BHTE = self.q(h_BTD).view(B, T, H, E).transpose(1, 2)
        k_BHTE = self.k(h_BTD).view(B, T, H, E).transpose(1, 2)
        v_BHTE = self.v(h_BTD).view(B, T, H, E).transpose(1, 2)
        scores_BHTT = q_BHTE @ k_BHTE.transpose(-2, -1) / math.sqrt(E) + mask_HTT
        att_BHTT = torch.softmax(scores_BHTT, dim=-1)
        y_BTD = (att_BHTT @ v_BHTE).transpose(1, 2).reshape(B, T, D)
        x_BTD = x_BTD + self.o(y_BTD)
        out_BTD: torch.Tensor = x_BTD + self.fc2(F.gelu(self.fc1(self.ln2(x_BTD))))
        return out_BTD


class ReferenceModel(nn.Module):
    """Same function as a full-vocabulary :class:`DeptModel`, written the obvious way."""

    alibi_mask: torch.Tensor  # (H, max_seq_len, max_seq_len)

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.wte = nn.Parameter(torch.zeros(vocab_size, config.d_model))
        self.layers = nn.ModuleList(ReferenceBlock(config) for _ in range(config.n_layers))
        self.ln_f = _norm(config)
        slopes_H = torch.tensor(reference_slopes(config.n_heads))
        i = torch.arange(config.max_seq_len)
        dist_TT = (i[None, :] - i[:, None]).float()
        mask = slopes_H[:, None, None] * dist_TT
        self.register_buffer("alibi_mask", mask.masked_fill(dist_TT > 0, float("-inf")), persistent=False)

    def forward(self, ids_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        T = ids_BT.shape[1]
        x_BTD = F.embedding(ids_BT, self.wte)
        mask_HTT = self.alibi_mask[:, :T, :T]
        for layer in self.layers:
            x_BTD = layer(x_BTD, mask_HTT)
        logits_BTV = self.ln_f(x_BTD) @ self.wte.T
        return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1))

    def body_parameters(self) -> list[nn.Parameter]:
        """Everything but the tied embedding."""
        return [p for name, p in self.named_parameters() if name != "wte"]


@torch.no_grad()
def reference_from(model: DeptModel) -> ReferenceModel:
    """A :class:`ReferenceModel` with the same weights (full-vocabulary embeddings only).

    Raises:
        ValueError: for embeddings that are not a full ``[V, D]`` matrix (TRIM).
    """
    emb = model.embeddings
    if emb.num_rows != emb.vocab_size:
        raise ValueError("reference_from supports full-vocabulary embeddings only")
    config = model.config
    ref = ReferenceModel(config, emb.vocab_size)
    ref.wte.copy_(emb.weight)
    for block, layer in zip(model.body.blocks, ref.layers, strict=True):
        assert isinstance(block, Block) and isinstance(layer, ReferenceBlock)
        for name in ("weight", "bias"):
            qkv = getattr(block.attn.qkv, name)
            if qkv is None:
                continue
            for part, chunk in zip((layer.q, layer.k, layer.v), qkv.chunk(3, dim=0), strict=True):
                getattr(part, name).copy_(chunk)
        pairs: list[tuple[nn.Module, nn.Module]] = [
            (block.attn.proj, layer.o),
            (block.mlp.fc1, layer.fc1),
            (block.mlp.fc2, layer.fc2),
            (block.norm1, layer.ln1),
            (block.norm2, layer.ln2),
        ]
        for src, dst in pairs:
            dst.load_state_dict(src.state_dict())
    ref.ln_f.load_state_dict(model.body.norm_f.state_dict())
    return ref


class ReferenceTrainer:
    """Plain step: full logits, autograd everywhere, ``torch.optim.AdamW(foreach=False)``; same schedule
    and weight-decay groups as :class:`dept_model.train.Trainer`."""

    def __init__(self, model: ReferenceModel, config: TrainConfig) -> None:
        self.model = model
        self.config = config
        body = model.body_parameters()
        groups = [
            {"params": [p for p in body if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in body if p.dim() < 2], "weight_decay": 0.0},
            {"params": [model.wte], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, eps=config.eps, foreach=False, fused=False
        )
        self.step_count = 0

    def step(self, x_BT: torch.Tensor, y_BT: torch.Tensor) -> float:
        """One plain optimizer step; returns the loss before the update."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step_count, self.config)
        self.model.train()
        loss = self.model(x_BT, y_BT)
        loss.backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip, foreach=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return float(loss.detach())
