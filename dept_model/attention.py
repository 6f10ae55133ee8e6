"""Causal multi-head self-attention with ALiBi, on ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the universal PyTorch alias)
from torch import nn

from dept_model.config import ModelConfig

# Shapes: B batch, T sequence, D model width, H heads, E head width (D = H * E).


class CausalSelfAttention(nn.Module):
    """One fused ``qkv`` projection, SDPA with an additive ALiBi bias, one output projection.

    The bias ``(H, T, T)`` carries both the ALiBi distances and the causal ``-inf`` mask, so the
    same call serves CPU (flash kernel with mask) and CUDA (memory-efficient kernel with bias).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x_BTD: torch.Tensor, bias_HTT: torch.Tensor) -> torch.Tensor:
        """Attend causally; ``bias_HTT`` must have the dtype of the attention inputs."""
        B, T, D = x_BTD.shape
        qkv_BT3HE = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim)
        q_BHTE, k_BHTE, v_BHTE = qkv_BT3HE.permute(2, 0, 3, 1, 4).unbind(0)
        y_BHTE = F.scaled_dot_product_attention(
            q_BHTE,
            k_BHTE,
            v_BHTE,
            attn_mask=bias_HTT.unsqueeze(0),  # 4-D: a 3-D mask sends CPU SDPA to its slow math path
            dropout_p=self.dropout if self.training else 0.0,
        )
        y_BTD = y_BHTE.transpose(1, 2).reshape(B, T, D)
        out_BTD: torch.Tensor = self.proj(y_BTD)
        return out_BTD
