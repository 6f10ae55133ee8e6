"""Held-out evaluation: mean loss, perplexity and bits per byte over a stream of batches."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch

from dept_model.model import DeptModel

# Shapes: B batch, T sequence, V vocabulary.


@torch.no_grad()
def evaluate(
    model: DeptModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_byte_lengths: torch.Tensor | None = None,
    *,
    autocast_bf16: bool | None = None,
) -> dict[str, float]:
    """Score every batch and return ``loss``, ``ppl``, ``bits_per_byte``, ``tokens`` and ``ignored_tokens``.

    ``loss`` is the mean NLL (nats) over scored targets; ``bits_per_byte`` is the summed NLL over
    ``ln 2`` times the UTF-8 byte length of the scored target tokens (NaN without
    ``token_byte_lengths``). Targets a TRIM embedding has no row for are not scored: they are
    reported in ``ignored_tokens`` (and bias ``loss`` low, which is why the count is returned).

    Args:
        model: the model; its mode is restored afterwards.
        batches: ``(x_BT, y_BT)`` pairs of global token ids.
        token_byte_lengths: int64 ``[V]``, bytes each token id stands for.
        autocast_bf16: None = on for CUDA only.

    Raises:
        ValueError: if no target was scored.
    """
    device = next(model.parameters()).device
    use_autocast = autocast_bf16 if autocast_bf16 is not None else device.type == "cuda"
    lengths_V = (
        None if token_byte_lengths is None else token_byte_lengths.to(device=device, dtype=torch.int64)
    )
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    num_bytes = torch.zeros((), dtype=torch.int64, device=device)
    ctx: contextlib.AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    )
    try:
        with ctx:
            for x_BT, y_BT in batches:
                x_BT = x_BT.to(device, non_blocking=True)
                y_BT = y_BT.to(device, non_blocking=True)
                batch_nll, scored_BT = model.nll(x_BT, y_BT)
                nll += batch_nll.double()
                tokens += scored_BT.sum()
                total += y_BT.numel()
                if lengths_V is not None:
                    num_bytes += lengths_V[y_BT[scored_BT]].sum()
    finally:
        model.train(was_training)
    n = int(tokens)
    if n == 0:
        raise ValueError("evaluate: no target token was scored")
    loss = float(nll) / n
    bpb = (
        float(nll) / (math.log(2) * int(num_bytes))
        if lengths_V is not None and int(num_bytes) > 0
        else math.nan
    )
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bits_per_byte": bpb,
        "tokens": float(n),
        "ignored_tokens": float(int(total) - n),
    }
