"""Cross-entropy through the tied output matrix, chunked over tokens so [N, V] logits never exist at once."""

from __future__ import annotations

from typing import Any

import torch

# Shapes: N tokens (B * T flattened), D model width, V vocabulary rows of the output matrix,
# C tokens in one chunk.

IGNORE_INDEX = -100


def _compute_dtype(h_ND: torch.Tensor, weight_VD: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick here (bf16 under CUDA autocast), else the inputs' dtype."""
    device_type = h_ND.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(h_ND.dtype, weight_VD.dtype)


def default_chunk_tokens(vocab_rows: int, device: torch.device) -> int:
    """Tokens per chunk so one chunk of float32 logits stays cache-sized on CPU (~16 MiB, measured
    fastest here) and around 1 GiB on CUDA, where bigger matmuls pay."""
    budget = 1 << 22 if device.type == "cpu" else 1 << 28
    return max(64, budget // max(1, vocab_rows))


def _log_softmax_(logits_CV: torch.Tensor) -> torch.Tensor:
    """Row log-softmax, in place on CPU (one fused kernel, no second [C, V] buffer)."""
    if logits_CV.device.type == "cpu":
        out_CV: torch.Tensor = torch.ops.aten._log_softmax.out(logits_CV, -1, False, out=logits_CV)
        return out_CV
    return torch.log_softmax(logits_CV, dim=-1)


def _chunk_logp(
    h_CD: torch.Tensor, w_VD: torch.Tensor, t_C: torch.Tensor, valid_C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 log-probabilities ``[C, V]`` of one chunk and its summed NLL."""
    logits_CV = h_CD @ w_VD.T
    logp_CV = _log_softmax_(logits_CV.float() if logits_CV.dtype != torch.float32 else logits_CV)
    target_C = logp_CV.gather(1, t_C.clamp(min=0)[:, None]).squeeze(1)
    return logp_CV, -torch.where(valid_C, target_C, 0.0).sum()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Computes the loss and, chunk by chunk, its gradients in the forward pass.

    Each chunk's logits are turned into ``softmax - onehot`` in place and consumed at once by the
    two gradient matmuls, so memory holds one chunk of logits plus grad_h [N, D] and grad_w [V, D]
    (which autograd would hold anyway). The backward only scales them by the incoming gradient.
    This costs the same three matmuls as unchunked autograd, and no recomputation.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h_ND: torch.Tensor,
        weight_VD: torch.Tensor,
        targets_N: torch.Tensor,
        chunk_tokens: int,
        compute_dtype: torch.dtype,
        ignore_index: int,
        mean: bool,
        need_grad_h: bool,
        need_grad_w: bool,
    ) -> torch.Tensor:
        N = h_ND.shape[0]
        valid_N = targets_N != ignore_index
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        scale = 1.0 / valid_N.sum().to(torch.float32) if mean else total.new_ones(())
        w_VD = weight_VD.to(compute_dtype)
        grad_h_ND = torch.empty_like(h_ND) if need_grad_h else None
        grad_w_VD = (
            torch.zeros(weight_VD.shape, dtype=torch.float32, device=h_ND.device) if need_grad_w else None
        )
        with torch.autocast(h_ND.device.type, enabled=False):
            for start in range(0, N, chunk_tokens):
                stop = min(start + chunk_tokens, N)
                h_CD = h_ND[start:stop].to(compute_dtype)
                t_C = targets_N[start:stop]
                valid_C = valid_N[start:stop]
                logp_CV, nll = _chunk_logp(h_CD, w_VD, t_C, valid_C)
                total += nll
                # d loss / d logits = (softmax - onehot(target)) * row scale (0 on ignored rows,
                # 1/n_valid for the mean); the row scale is applied to the [C, D] operands, not [C, V].
                valid_f_C = valid_C.to(torch.float32)
                probs_CV = logp_CV.exp_()
                probs_CV.scatter_add_(1, t_C.clamp(min=0)[:, None], -valid_f_C[:, None])
                g_CV = probs_CV.to(compute_dtype)
                row_scale_C1 = (valid_f_C * scale)[:, None]
                if grad_h_ND is not None:
                    grad_h_ND[start:stop] = (g_CV @ w_VD) * row_scale_C1
                if grad_w_VD is not None:
                    h_scaled_CD = (h_CD * row_scale_C1).to(compute_dtype)
                    if compute_dtype == torch.float32:
                        grad_w_VD.addmm_(g_CV.T, h_scaled_CD)
                    else:
                        grad_w_VD += (g_CV.T @ h_scaled_CD).float()
        ctx.save_for_backward(grad_h_ND, grad_w_VD)
        ctx.weight_dtype = weight_VD.dtype
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        gh = None if grad_h_ND is None else grad_h_ND * grad_out.to(grad_h_ND.dtype)
        gw = None if grad_w_VD is None else (grad_w_VD * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None, None


def chunked_cross_entropy(
    h_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``F.cross_entropy(h_ND @ weight_VD.T, targets_N)`` without ever holding the [N, V] logits.

    Same math as the full cross-entropy (log-sum-exp in float32); targets equal to
    ``ignore_index`` contribute nothing and are not counted by ``"mean"`` (all ignored gives NaN,
    as ``F.cross_entropy`` does). Under autocast the matmuls run in the autocast dtype.

    Args:
        h_ND: final hidden states, one row per token.
        weight_VD: output matrix (the tied embedding), one row per vocabulary entry.
        targets_N: int64 row indices into ``weight_VD`` or ``ignore_index``.
        chunk_tokens: tokens per chunk (peak extra memory ``chunk_tokens * V`` floats); None picks
            :func:`default_chunk_tokens` for the device.
        reduction: ``"mean"`` over non-ignored tokens or ``"sum"``.
        ignore_index: target value that is skipped.

    Returns:
        The float32 scalar loss.

    Raises:
        ValueError: on bad shapes, chunk size or reduction.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight_VD.shape[0], h_ND.device)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if h_ND.dim() != 2 or weight_VD.dim() != 2 or h_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"expected h [N, D] and weight [V, D], got {tuple(h_ND.shape)}, {tuple(weight_VD.shape)}"
        )
    if targets_N.shape != h_ND.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets_N.shape)} != ({h_ND.shape[0]},)")
    compute_dtype = _compute_dtype(h_ND, weight_VD)
    mean = reduction == "mean"
    need_h = h_ND.requires_grad
    need_w = weight_VD.requires_grad
    if torch.is_grad_enabled() and (need_h or need_w):
        loss: torch.Tensor = _FusedLinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
            h_ND, weight_VD, targets_N, chunk_tokens, compute_dtype, ignore_index, mean, need_h, need_w
        )
        return loss
    valid_N = targets_N != ignore_index
    total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    w_VD = weight_VD.to(compute_dtype)
    with torch.autocast(h_ND.device.type, enabled=False):
        for start in range(0, h_ND.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            h_CD = h_ND[start:stop].to(compute_dtype)
            total += _chunk_logp(h_CD, w_VD, targets_N[start:stop], valid_N[start:stop])[1]
    return total / valid_N.sum() if mean else total
