"""The shared transformer body (pre-norm ALiBi blocks + final norm) and ``DeptModel`` = body + one source's embeddings."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F  # noqa: N812 (the universal PyTorch alias)
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from dept_model.alibi import AlibiCache, alibi_bias, alibi_slopes
from dept_model.attention import AttentionInputs, CausalSelfAttention, causal_block_mask, resolve_attn_impl
from dept_model.config import ModelConfig
from dept_model.embeddings import TiedEmbeddings
from dept_model.loss import IGNORE_INDEX, chunked_cross_entropy

# Shapes: B batch, T sequence, D model width, F feed-forward width, H heads, V vocabulary rows.


def _norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``, exact GELU as in MPT."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        out_BTD: torch.Tensor = self.fc2(F.gelu(self.fc1(x_BTD)))
        return out_BTD


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = _norm(config)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def forward(self, x_BTD: torch.Tensor, attn: AttentionInputs | torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self._drop(self.attn(self.norm1(x_BTD), attn))
        return x_BTD + self._drop(self.mlp(self.norm2(x_BTD)))


class Body(nn.Module):
    """Every parameter shared across sources: the blocks and the final norm; no positional parameters.

    ``state_dict()`` holds only body tensors (``blocks.0.attn.qkv.weight``, ..., ``norm_f.weight``).
    ``attn_impl`` (``auto``, ``flex``, ``sdpa``; see :mod:`dept_model.attention`) and
    ``activation_checkpointing`` (recompute each block in the backward pass instead of keeping its
    activations) change how, not what, it computes.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        seed: int = 0,
        attn_impl: str = "auto",
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = _norm(config)
        self.alibi = AlibiCache(config.n_heads)
        self._flex_cache: dict[tuple[int, str, bool], tuple[torch.Tensor, BlockMask]] = {}
        self.attn_impl = "auto"
        self.set_attention(attn_impl)
        self.activation_checkpointing = activation_checkpointing
        self.reset_parameters(seed)

    def set_attention(self, impl: str) -> None:
        """Choose ``auto``, ``flex`` or ``sdpa`` attention (validated now against this config's dropout).

        Raises:
            ValueError: an unknown implementation, or ``flex`` with dropout.
        """
        resolve_attn_impl(impl, torch.device("cuda"), self.config.dropout)
        self.attn_impl = impl

    def attention_inputs(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> AttentionInputs:
        """The per-forward attention inputs for this length, device and attention dtype."""
        impl = resolve_attn_impl(self.attn_impl, device, self.config.dropout)
        if impl == "flex":
            slopes_H, block_mask = self._flex_inputs(seq_len, device, dtype == torch.float64)
            return AttentionInputs("flex", slopes_H=slopes_H, block_mask=block_mask)
        if torch.compiler.is_compiling():
            # Built inside the graph: a cache lookup would make dynamo guard on (and recompile for)
            # the cache's contents; compiled, the bias is one fused elementwise kernel.
            bias_HTT = alibi_bias(self.config.n_heads, seq_len, dtype=dtype, device=device)
        else:
            bias_HTT = self.alibi.get(seq_len, device, dtype)
        return AttentionInputs("sdpa", bias_HTT=bias_HTT)

    @torch.compiler.disable  # type: ignore[untyped-decorator,misc,unused-ignore]
    def _flex_inputs(
        self, seq_len: int, device: torch.device, double: bool
    ) -> tuple[torch.Tensor, BlockMask]:
        # Outside any compiled graph (one graph break): the block mask is built once per length and
        # device and enters the graph as an input, so dynamo neither traces its construction nor
        # guards on the cache.
        key = (seq_len, str(device), double)
        hit = self._flex_cache.get(key)
        if hit is None:
            dtype = torch.float64 if double else torch.float32
            slopes_H = torch.tensor(alibi_slopes(self.config.n_heads), dtype=dtype, device=device)
            hit = self._flex_cache[key] = (slopes_H, causal_block_mask(seq_len, device))
        return hit

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2/MPT init from a private generator: N(0, init_std) for matrices, the residual
        output projections scaled by 1/sqrt(2 * n_layers), zero biases, unit norm weights."""
        gen = torch.Generator().manual_seed(seed)
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            else:
                is_out = name.endswith(("attn.proj.weight", "mlp.fc2.weight"))
                cpu = torch.empty(param.shape).normal_(0.0, out_std if is_out else std, generator=gen)
                param.copy_(cpu)

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """``[B, T, D] -> [B, T, D]`` (after the final norm)."""
        device_type = h_BTD.device.type
        attn_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h_BTD.dtype
        )
        attn = self.attention_inputs(h_BTD.shape[1], h_BTD.device, attn_dtype)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h_BTD = checkpoint(block, h_BTD, attn, use_reentrant=False) if recompute else block(h_BTD, attn)
        out_BTD: torch.Tensor = self.norm_f(h_BTD)
        return out_BTD


def _check_state(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in expected.items():
        if tuple(given[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{what} state {name}: shape {tuple(given[name].shape)} != {tuple(tensor.shape)}"
            )


class DeptModel(nn.Module):
    """A shared :class:`Body` with one source's tied :class:`TiedEmbeddings`.

    ``forward(ids, targets)`` returns the mean loss (chunked cross-entropy, never the full logits);
    ``forward(ids)`` returns logits over the embedding's local rows.
    """

    def __init__(
        self, body: Body, embeddings: TiedEmbeddings, *, loss_chunk_tokens: int | None = None
    ) -> None:
        super().__init__()
        if embeddings.d_model != body.config.d_model:
            raise ValueError(f"embedding width {embeddings.d_model} != body width {body.config.d_model}")
        self.body = body
        self.embeddings = embeddings
        self.loss_chunk_tokens = loss_chunk_tokens
        self.dropout = body.config.dropout

    @property
    def config(self) -> ModelConfig:
        """The body's configuration."""
        return self.body.config

    def hidden(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, T, D]`` for global token ids ``[B, T]``."""
        h_BTD = self.embeddings(ids_BT)
        if self.dropout > 0:
            h_BTD = F.dropout(h_BTD, self.dropout, self.training)
        out_BTD: torch.Tensor = self.body(h_BTD)
        return out_BTD

    def forward(self, ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss if ``targets_BT`` is given, else logits ``[B, T, V_local]``."""
        h_BTD = self.hidden(ids_BT)
        if targets_BT is None:
            return self.embeddings.logits(h_BTD)
        return self.embeddings.loss(h_BTD, targets_BT, chunk_tokens=self.loss_chunk_tokens)

    def nll(self, ids_BT: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(summed NLL in nats, bool [B, T] mask of the targets that were scored)``."""
        local_BT = self.embeddings.local_targets(targets_BT)
        h_BTD = self.hidden(ids_BT)
        total = chunked_cross_entropy(
            h_BTD.reshape(-1, h_BTD.shape[-1]),
            self.embeddings.weight,
            local_BT.reshape(-1),
            chunk_tokens=self.loss_chunk_tokens,
            reduction="sum",
        )
        return total, local_BT != IGNORE_INDEX

    def body_parameters(self) -> list[nn.Parameter]:
        """Parameters shared across sources (what DiLoCo-style rounds average)."""
        return list(self.body.parameters())

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters of this source's embeddings."""
        return list(self.embeddings.parameters())

    def body_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the body tensors, keyed like ``Body.state_dict()``."""
        return {name: t.detach().clone() for name, t in self.body.state_dict().items()}

    def load_body_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the body in place (parameters keep their identity, so optimizer state survives).

        Raises:
            ValueError: if the keys or shapes differ from this body's.
        """
        _check_state(self.body.state_dict(), state, "body")
        self.body.load_state_dict(dict(state), strict=True)

    def embedding_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the embedding tensors (``weight``; TRIM adds ``row_ids``)."""
        return {name: t.detach().clone() for name, t in self.embeddings.state_dict().items()}

    def load_embedding_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the embeddings in place.

        Raises:
            ValueError: if the keys or shapes differ.
        """
        _check_state(self.embeddings.state_dict(), state, "embedding")
        self.embeddings.load_state_dict(dict(state), strict=True)
