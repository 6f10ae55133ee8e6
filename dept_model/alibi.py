"""ALiBi position biases: per-head slopes and the causal additive attention bias, cached per shape."""

from __future__ import annotations

import math

import torch

# Shapes: H heads, T query positions, S key positions (S == T for causal self-attention).


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head ALiBi slopes (Press et al., 2022).

    For a power-of-two ``H`` the slopes are ``2^(-8h/H)``, h = 1..H. Otherwise the standard
    extension is used: the slopes of the closest lower power of two ``n``, followed by every other
    slope of ``2n`` (the odd-numbered ones), up to ``H`` heads.

    Raises:
        ValueError: if ``num_heads < 1``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    if n < num_heads:
        slopes += [2.0 ** (-8.0 * h / (2 * n)) for h in range(1, 2 * n + 1, 2)][: num_heads - n]
    return slopes


def alibi_bias(
    num_heads: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Causal ALiBi bias ``(H, T, T)``: ``slope_h * (j - i)`` on and below the diagonal, -inf above.

    Built in float64 and cast once, so every dtype sees correctly rounded values.
    """
    slope_H = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64, device=device)
    pos_T = torch.arange(seq_len, dtype=torch.float64, device=device)
    dist_TS = pos_T[None, :] - pos_T[:, None]  # j - i, <= 0 on and below the diagonal
    bias_HTS = slope_H[:, None, None] * dist_TS
    bias_HTS = bias_HTS.masked_fill(dist_TS > 0, float("-inf"))
    return bias_HTS.to(dtype)


class AlibiCache:
    """Builds the ``(H, T, T)`` bias once per (T, device, dtype) and hands out the cached tensor.

    Not an ``nn.Module`` buffer on purpose: the bias is derived data, it must never appear in a
    state dict, and it is shared by every block of a body. A handful of entries are kept (training
    and evaluation usually use one or two sequence lengths).
    """

    def __init__(self, num_heads: int, max_entries: int = 4) -> None:
        self.num_heads = num_heads
        self.max_entries = max_entries
        self._cache: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}

    def get(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The causal bias ``(H, T, T)`` for this length, device and dtype."""
        key = (seq_len, str(device), dtype)
        bias = self._cache.get(key)
        if bias is None:
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            bias = alibi_bias(self.num_heads, seq_len, dtype=dtype, device=device)
            self._cache[key] = bias
        return bias

    def clear(self) -> None:
        """Drop every cached bias (e.g. after moving the model to another device)."""
        self._cache.clear()
