"""``dept-bench step`` fast mode: the FLOP formula, the peak table and the shape of its rows."""

from __future__ import annotations

import torch

from dept_bench.step import FAST_IMPLS, peak_bf16_flops, run_fast, train_flops_per_token
from dept_model.config import model_preset


def test_flops_per_token_is_the_palm_formula() -> None:
    # 125m: L=12, D=768, F=3072, H*Dh=768, V=50304, T=2048, written out by hand.
    n = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50304 * 768
    assert train_flops_per_token(model_preset("125m"), 50304, 2048) == 6 * n + 12 * 12 * 768 * 2048
    assert (
        train_flops_per_token(model_preset("125m"), 50304, 2048, causal=True) == 6 * n + 6 * 12 * 768 * 2048
    )


def test_peak_table_prefers_the_longest_name() -> None:
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("cpu") is None


def test_fast_rows_on_cpu() -> None:
    result = run_fast(["tiny"], torch.device("cpu"), quick=True)
    rows = {r["impl"]: r for r in result["results"]}
    assert set(rows) == {f"{a}-{'compiled' if c else 'eager'}" for a, c in FAST_IMPLS}
    eager = rows["sdpa-eager"]
    assert eager["tokens_per_s"] > 0 and eager["mfu"] is None and eager["loss_step0_gap"] == 0.0
    assert "backward on CPU" in rows["flex-eager"]["error"]  # FlexAttention trains on CUDA only
    assert "skipped in quick mode" in rows["sdpa-compiled"]["error"]
    assert "6 * N + 12 * L * H * Dh * T" in result["flop_formula"]
