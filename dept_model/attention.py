"""Causal multi-head self-attention with ALiBi: SDPA with a dense additive bias, or FlexAttention.

Two implementations compute the same function:

* ``sdpa``: ``F.scaled_dot_product_attention`` with the cached ``(H, T, T)`` bias (ALiBi distances
  plus the causal ``-inf``). Works everywhere, supports dropout; the reference. A dense bias rules
  out the flash kernel on CUDA (the memory-efficient kernel reads the bias: 100 MB per call for 125m
  at T = 2048).
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``score_mod`` adding ``slope_h * (j - i)``
  and a causal block mask, so fully masked tiles are skipped and no bias is materialised. Fast
  only when compiled: outside a compiled model the call goes through a lazily compiled
  ``flex_attention`` on CUDA, and through the eager (math) implementation on CPU, which is exact
  but slow (used by the tests as a check against the float64 reference).

``auto`` picks ``flex`` on CUDA (no dropout) and ``sdpa`` elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the universal PyTorch alias)
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from dept_model.config import ModelConfig

# Shapes: B batch, T sequence, D model width, H heads, E head width (D = H * E).

ATTN_IMPLS = ("auto", "flex", "sdpa")


def resolve_attn_impl(impl: str, device: torch.device, dropout: float = 0.0) -> str:
    """``flex`` or ``sdpa`` for a requested ``impl`` (``auto``, ``flex``, ``sdpa``) on ``device``.

    ``auto`` is ``flex`` on CUDA and ``sdpa`` elsewhere; dropout always needs ``sdpa`` (FlexAttention
    has no attention dropout).

    Raises:
        ValueError: an unknown ``impl``, or ``flex`` asked for with dropout.
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "flex" if device.type == "cuda" and dropout == 0.0 else "sdpa"
    if impl == "flex" and dropout > 0.0:
        raise ValueError("attention 'flex' does not support dropout; use 'sdpa' or dropout=0")
    return impl


def _causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    return q_idx >= kv_idx


def causal_block_mask(seq_len: int, device: torch.device) -> BlockMask:
    """FlexAttention's block mask for causal self-attention over ``seq_len`` positions."""
    return create_block_mask(_causal, None, None, seq_len, seq_len, device=device)


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    # One compiled kernel per shape family; eager flex_attention on CUDA is the slow math path.
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True, slots=True)
class AttentionInputs:
    """What every layer of one forward shares: the dense bias (``sdpa``) or slopes + block mask (``flex``)."""

    impl: str
    bias_HTT: torch.Tensor | None = None  # noqa: N815 (shape suffix)
    slopes_H: torch.Tensor | None = None  # noqa: N815 (shape suffix)
    block_mask: BlockMask | None = None


def flex_alibi(
    q_BHTE: torch.Tensor,
    k_BHTE: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    block_mask: BlockMask,
) -> torch.Tensor:
    """Causal ALiBi attention through FlexAttention: score ``q.k / sqrt(E) + slope_h * (j - i)``."""

    def alibi(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return score + slopes_H[h] * (kv_idx - q_idx)

    if torch.compiler.is_compiling() or q_BHTE.device.type != "cuda":
        fn: Callable[..., Any] = flex_attention
    else:
        fn = _compiled_flex()
    out: torch.Tensor = fn(q_BHTE, k_BHTE, v_BHTE, score_mod=alibi, block_mask=block_mask)
    return out


class CausalSelfAttention(nn.Module):
    """One fused ``qkv`` projection, ALiBi attention (SDPA or Flex), one output projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x_BTD: torch.Tensor, attn: AttentionInputs | torch.Tensor) -> torch.Tensor:
        """Attend causally. A bare tensor is the ``sdpa`` bias ``(H, T, T)``, in the attention dtype."""
        if isinstance(attn, torch.Tensor):
            attn = AttentionInputs("sdpa", bias_HTT=attn)
        B, T, D = x_BTD.shape
        qkv_BT3HE = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim)
        q_BHTE, k_BHTE, v_BHTE = qkv_BT3HE.permute(2, 0, 3, 1, 4).unbind(0)
        if attn.impl == "flex":
            assert attn.slopes_H is not None and attn.block_mask is not None
            y_BHTE = flex_alibi(q_BHTE, k_BHTE, v_BHTE, attn.slopes_H, attn.block_mask)
        else:
            assert attn.bias_HTT is not None
            y_BHTE = F.scaled_dot_product_attention(
                q_BHTE,
                k_BHTE,
                v_BHTE,
                attn_mask=attn.bias_HTT.unsqueeze(0),  # 4-D: a 3-D mask sends CPU SDPA to its slow math path
                dropout_p=self.dropout if self.training else 0.0,
            )
        y_BTD = y_BHTE.transpose(1, 2).reshape(B, T, D)
        out_BTD: torch.Tensor = self.proj(y_BTD)
        return out_BTD
