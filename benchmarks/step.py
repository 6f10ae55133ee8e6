"""Training-step benchmark: the plain reference step against the real Trainer step, eager and compiled."""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dept_model.config import ModelConfig, model_preset
from dept_model.model import DeptModel
from dept_model.reference import ReferenceModel, ReferenceTrainer, reference_from
from dept_model.train import TrainConfig, Trainer
from dept_model.variants import Variant, build_model

# Shapes: B batch, T sequence.

logger = logging.getLogger(__name__)

# preset -> (vocab, batch, seq_len); vocab sized like a small per-source BPE tokenizer
SETUPS = {"tiny": (2048, 8, 128), "small": (8192, 8, 256)}
# On CUDA also a paper-sized body with a GPT-2-sized vocabulary (batch 4: the reference's explicit
# attention keeps (B, H, T, T) float32 scores per layer).
CUDA_SETUPS = {"125m": (50304, 4, 2048)}
LOSS_STEPS = 10
THREADS = 2

# The fast-step benchmark (``--presets``, and the default on CUDA): preset -> (vocab, batch, seq_len).
FAST_SETUPS = {
    "tiny": (2048, 8, 128),
    "small": (8192, 8, 256),
    "125m": (50304, 32, 2048),
    "350m": (50304, 16, 2048),
    "1.3b": (50304, 8, 2048),
}
# (attention, compiled): compiled first, the figures that matter, in case a stage runs out of time.
FAST_IMPLS = (("flex", True), ("sdpa", True), ("flex", False), ("sdpa", False))

# Dense bf16 tensor-core peak FLOP/s by device name (vendor datasheets, no sparsity); the longest
# key found in ``torch.cuda.get_device_name()`` wins (so "H100 PCIe" beats "H100").
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "GH200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
}

FLOP_FORMULA = (
    "training FLOPs per token = 6 * N + 12 * L * H * Dh * T (PaLM, Chowdhery et al. 2022, app. B): "
    "N = parameters that enter matmuls = L * (4 * D^2 + 2 * D * F) body matrices + V * D tied output "
    "projection (the embedding lookup, norms and biases are not counted); 12 * L * H * Dh * T = QK^T and "
    "AV, forward and backward, over the full T x T square (causal attention needs half of it: mfu_causal "
    "counts 6 * L * H * Dh * T instead); mfu = tokens/s * FLOPs per token / the device's dense bf16 peak"
)


def train_flops_per_token(config: ModelConfig, vocab: int, seq_len: int, *, causal: bool = False) -> float:
    """Training FLOPs per token of the body + tied head, as :data:`FLOP_FORMULA` states."""
    D, F, L = config.d_model, config.d_ff, config.n_layers
    n_matmul = L * (4 * D * D + 2 * D * F) + vocab * D
    attention = (6 if causal else 12) * L * config.n_heads * config.head_dim * seq_len
    return float(6 * n_matmul + attention)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by name (:data:`PEAK_BF16_FLOPS`), None when unknown."""
    found = [key for key in PEAK_BF16_FLOPS if key in device_name]
    return PEAK_BF16_FLOPS[max(found, key=len)] if found else None


@dataclass
class _Impl:
    name: str
    step: Callable[[torch.Tensor, torch.Tensor], float]
    eval_loss: Callable[[torch.Tensor, torch.Tensor], float]
    static_bytes: Callable[[], int]
    step_s: list[float]
    loss_after_10: float | None = None
    error: str | None = None


def _synthetic_batches(
    vocab: int, batch: int, seq_len: int, n: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable stream: half the time the next token follows a fixed permutation, else Zipf noise."""
    gen = torch.Generator().manual_seed(seed)
    zipf_V = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    follow_V = torch.randperm(vocab, generator=gen)
    out = []
    for _ in range(n):
        noise_BT = torch.multinomial(zipf_V, batch * (seq_len + 1), replacement=True, generator=gen).view(
            batch, -1
        )
        keep_BT = torch.rand(batch, seq_len + 1, generator=gen) < 0.5
        toks_BT = noise_BT.clone()
        for t in range(1, seq_len + 1):
            toks_BT[:, t] = torch.where(keep_BT[:, t], follow_V[toks_BT[:, t - 1]], noise_BT[:, t])
        out.append((toks_BT[:, :-1].contiguous(), toks_BT[:, 1:].contiguous()))
    return out


def _state_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return _state_bytes([v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)])


def _make_real(name: str, init: DeptModel, cfg: TrainConfig, device: torch.device) -> _Impl:
    model = copy.deepcopy(init)
    trainer = Trainer(model, cfg, device)

    @torch.no_grad()
    def eval_loss(x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        with trainer._autocast():
            return float(model(x.to(device), y.to(device)))

    def static() -> int:
        return _state_bytes(list(model.parameters())) + _optimizer_bytes(trainer.optimizer)

    return _Impl(name, trainer.step, eval_loss, static, [])


def _make_reference(init: DeptModel, cfg: TrainConfig, device: torch.device) -> _Impl:
    model: ReferenceModel = reference_from(init).to(device)
    trainer = ReferenceTrainer(model, cfg)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        return trainer.step(x.to(device), y.to(device))

    @torch.no_grad()
    def eval_loss(x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        return float(model(x.to(device), y.to(device)))

    def static() -> int:
        return _state_bytes(list(model.parameters())) + _optimizer_bytes(trainer.optimizer)

    return _Impl("reference", step, eval_loss, static, [])


class _PeakRss:
    """Samples this process's resident set every millisecond; ``peak`` since the last ``reset``."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            with self._lock:  # never write back a peak read before a reset
                self.peak = max(self.peak, self.now())

    def reset(self) -> int:
        with self._lock:
            self.peak = self.now()
            return self.peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _set_mmap_threshold(num_bytes: int) -> None:
    """glibc: serve allocations above ``num_bytes`` with mmap so frees return memory (RSS tracks live)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, num_bytes)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except OSError:
        logger.warning("mallopt unavailable: CPU memory figures include allocator caching")


def _step_peak_bytes(
    impl: _Impl, x: torch.Tensor, y: torch.Tensor, device: torch.device, rss: _PeakRss
) -> int:
    """Static state (weights + optimizer) plus the transient peak of one step over its start."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        impl.step(x, y)
        transient = torch.cuda.max_memory_allocated() - start
    else:
        start = rss.reset()
        impl.step(x, y)
        transient = max(0, rss.peak - start)
    return impl.static_bytes() + transient


@dataclass
class _PresetRun:
    results: list[dict[str, Any]]
    impls: list[_Impl]
    batch: tuple[torch.Tensor, torch.Tensor]


def _bench_preset(preset: str, setup: tuple[int, int, int], quick: bool, device: torch.device) -> _PresetRun:
    vocab, batch, seq_len = setup
    config = model_preset(preset)
    warm, timed = (2, 4) if quick else (3, 12)
    n_steps = max(LOSS_STEPS, warm + timed)
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, total_steps=100)
    data = _synthetic_batches(vocab, batch, seq_len, n_steps + 1, seed=0)
    held_out = data.pop()
    init = build_model(config, Variant.GLOB, vocab_size=vocab, seed=0)
    # Like-for-like float32 first (autocast off), so loss_after_10 must match the reference; on
    # CUDA the production bf16-autocast steps follow.
    fp32 = dataclasses.replace(cfg, autocast_bf16=False)
    impls = [
        _make_reference(init, cfg, device),
        _make_real("eager", init, fp32, device),
        _make_real("compiled", init, dataclasses.replace(fp32, compile=True), device),
    ]
    if device.type == "cuda":
        impls.append(_make_real("eager-bf16", init, cfg, device))
        impls.append(_make_real("compiled-bf16", init, dataclasses.replace(cfg, compile=True), device))
    if quick:
        for impl in impls:
            if impl.name.startswith("compiled"):
                impl.error = "skipped in quick mode (first compile takes 10-60 s on CPU)"
    # Round-robin: every implementation takes step i before any takes step i + 1, so all see the
    # same machine load (this 2-core host is shared).
    for i, (x_BT, y_BT) in enumerate(data):
        for impl in impls:
            if impl.error is not None:
                continue
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                impl.step(x_BT, y_BT)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warm:
                    impl.step_s.append(time.perf_counter() - start)
                if i + 1 == LOSS_STEPS:
                    impl.loss_after_10 = impl.eval_loss(*held_out)
            except Exception as err:  # noqa: BLE001 (a compile failure is a result to report, not a crash)
                logger.warning("bench_impl_failed preset=%s impl=%s err=%s", preset, impl.name, err)
                impl.error = f"{type(err).__name__}: {str(err)[:500]}"
    tokens = batch * seq_len
    ref_tps = None
    results = []
    for impl in impls:
        entry: dict[str, Any] = {"preset": preset, "impl": impl.name}
        if impl.error is not None and not impl.step_s:
            entry["error"] = impl.error
            results.append(entry)
            continue
        median_s = statistics.median(impl.step_s)
        tps = tokens / median_s
        ref_tps = tps if impl.name == "reference" else ref_tps
        entry |= {
            "tokens_per_s": round(tps, 1),
            "peak_mem_mb": None,
            "loss_after_10": impl.loss_after_10,
            "step_s_median": round(median_s, 4),
            "step_s_min": round(min(impl.step_s), 4),
            "timed_steps": len(impl.step_s),
        }
        if ref_tps:
            entry["speedup_vs_reference"] = round(tps / ref_tps, 3)
        results.append(entry)
    logger.info("bench_step_preset preset=%s results=%s", preset, results)
    return _PresetRun(results, impls, data[0])


def _measure_memory(runs: list[_PresetRun], device: torch.device, rss: _PeakRss) -> None:
    """One more step per implementation, after all timing, with allocations above 64 KiB mmapped on
    CPU so that freed memory leaves the RSS (timing ran with glibc's default allocator behaviour)."""
    if device.type == "cpu":
        _set_mmap_threshold(64 << 10)
    for run in runs:
        for impl, entry in zip(run.impls, run.results, strict=True):
            if "error" not in entry:
                entry["peak_mem_mb"] = round(_step_peak_bytes(impl, *run.batch, device, rss) / 2**20, 1)
    if device.type == "cpu":
        _set_mmap_threshold(32 << 20)


def _acceptance(results: list[dict[str, Any]], preset: str) -> dict[str, Any]:
    """Best real step against the reference on one preset: speed ratio and loss gap after 10 steps."""
    ref = next(
        (r for r in results if r["preset"] == preset and r["impl"] == "reference" and "error" not in r), None
    )
    real = [
        r
        for r in results
        if r["preset"] == preset and r["impl"] in ("eager", "compiled") and "error" not in r
    ]
    if ref is None or not real:
        return {"preset": preset, "error": "missing reference or real step"}
    best = max(real, key=lambda r: r["tokens_per_s"])
    return {
        "preset": preset,
        "best_impl": best["impl"],
        "speedup": round(best["tokens_per_s"] / ref["tokens_per_s"], 3),
        "loss_gap": abs(best["loss_after_10"] - ref["loss_after_10"]),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fast_one(
    preset: str,
    init: DeptModel,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    attn: str,
    compiled: bool,
    device: torch.device,
    steps: tuple[int, int],
) -> dict[str, Any]:
    """Warm-up then timed steps of one implementation; bf16 autocast on CUDA (the Trainer's default)."""
    warm, timed = steps
    cfg = TrainConfig(lr=1e-4, warmup_steps=1, total_steps=1000, attn_impl=attn, compile=compiled)
    trainer = Trainer(copy.deepcopy(init), cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s, losses = [], []
    first_s = 0.0
    for i in range(warm + timed):
        x, y = data[i % len(data)]
        _sync(device)
        start = time.perf_counter()
        losses.append(trainer.step(x, y))
        _sync(device)
        elapsed = time.perf_counter() - start
        if i == 0:
            first_s = elapsed
        if i >= warm:
            step_s.append(elapsed)
    median_s = statistics.median(step_s)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "step_s_median": round(median_s, 5),
        "step_s_min": round(min(step_s), 5),
        "first_step_s": round(first_s, 2),  # includes compilation
        "timed_steps": len(step_s),
        "loss_step0": losses[0],
        "loss_last": losses[-1],
        "peak_mem_gb": round(peak_mem / 2**30, 2) if peak_mem is not None else None,
    }


def _bench_fast(preset: str, device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Every (attention, compiled) pair of :data:`FAST_IMPLS` on one preset, same weights and batches."""
    vocab, batch, seq_len = FAST_SETUPS[preset]
    config = model_preset(preset)
    steps = (2, 3) if quick else (3, 10)
    init = build_model(config, Variant.GLOB, vocab_size=vocab, seed=0)
    gen = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device),
            torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device),
        )
        for _ in range(2)
    ]
    flops = train_flops_per_token(config, vocab, seq_len)
    flops_causal = train_flops_per_token(config, vocab, seq_len, causal=True)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tokens = batch * seq_len
    results: list[dict[str, Any]] = []
    for attn, compiled in FAST_IMPLS:
        entry: dict[str, Any] = {
            "preset": preset,
            "impl": f"{attn}-{'compiled' if compiled else 'eager'}"
            + ("-bf16" if device.type == "cuda" else ""),
            "attn": attn,
            "compiled": compiled,
            "batch": batch,
            "seq_len": seq_len,
            "vocab": vocab,
        }
        if quick and compiled and device.type == "cpu":
            entry["error"] = "skipped in quick mode (first compile takes 10-60 s on CPU)"
        else:
            try:
                entry |= _fast_one(preset, init, data, attn, compiled, device, steps)
                tps = tokens / entry["step_s_median"]
                entry["tokens_per_s"] = round(tps, 1)
                entry["model_tflops"] = round(tps * flops / 1e12, 2)
                entry["mfu"] = round(tps * flops / peak, 4) if peak else None
                entry["mfu_causal"] = round(tps * flops_causal / peak, 4) if peak else None
            except Exception as err:  # noqa: BLE001 (an unsupported path is a result to report)
                entry["error"] = f"{type(err).__name__}: {str(err)[:400]}"
            finally:
                gc.collect()
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        logger.info("bench_step_result %s", json.dumps(entry))
        results.append(entry)
    ok = [r for r in results if "loss_step0" in r]
    if ok:  # the same weights and batch: every implementation's first loss should agree
        ref = ok[-1]["loss_step0"]
        for r in ok:
            r["loss_step0_gap"] = round(abs(r["loss_step0"] - ref), 5)
    return results


def run_fast(presets: list[str], device: torch.device, quick: bool = False) -> dict[str, Any]:
    """The fast-step benchmark: flex/sdpa x compiled/eager per preset, tokens/s and MFU."""
    started = time.perf_counter()
    results = [entry for preset in presets for entry in _bench_fast(preset, device, quick)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_flops(name)
    return {
        "benchmark": "step",
        "mode": "fast",
        "results": results,
        "device": device.type,
        "device_name": name,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "flop_formula": FLOP_FORMULA,
        "flops_per_token": {
            p: train_flops_per_token(model_preset(p), FAST_SETUPS[p][0], FAST_SETUPS[p][2]) for p in presets
        },
        "torch": torch.__version__,
        "quick": quick,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def run(quick: bool = False, device: str | None = None, presets: str | None = None) -> dict[str, Any]:
    """Benchmark the training step.

    On CUDA (the default where available), or with ``presets``: :func:`run_fast` over ``presets``
    (CUDA default ``125m,350m``): FlexAttention and SDPA, compiled and eager, with ``mfu``. On CPU
    without ``presets``: ``tiny`` and ``small``, reference, eager and compiled steps on the same
    data and weights (``tokens_per_s`` from the median step time after warm-up steps;
    ``loss_after_10`` the loss on a held-out batch after 10 optimizer steps; ``peak_mem_mb``
    weights + optimizer state + the transient peak of one step), then the fast rows for ``tiny``.

    Raises:
        ValueError: an unknown preset.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" or presets is not None:
        names = [p.strip() for p in (presets or "125m,350m").split(",") if p.strip()]
        unknown = [p for p in names if p not in FAST_SETUPS]
        if unknown:
            raise ValueError(f"unknown presets {unknown}; choose from {sorted(FAST_SETUPS)}")
        if dev.type == "cpu":
            torch.set_num_threads(THREADS)
        return run_fast(names, dev, quick)
    legacy = _run_reference_comparison(quick, dev)
    legacy["fast"] = run_fast(["tiny"], dev, quick)
    return legacy


def _run_reference_comparison(quick: bool, device: torch.device) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    rss = _PeakRss()
    started = time.perf_counter()
    try:
        setups = SETUPS | (CUDA_SETUPS if device.type == "cuda" and not quick else {})
        runs = [_bench_preset(preset, setup, quick, device) for preset, setup in setups.items()]
        _measure_memory(runs, device, rss)
    finally:
        rss.close()
    results = [entry for run in runs for entry in run.results]
    return {
        "benchmark": "step",
        "results": results,
        "acceptance": _acceptance(results, "small"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": quick,
        "setups": {p: {"vocab": v, "batch": b, "seq_len": t} for p, (v, b, t) in setups.items()},
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "wall_s": round(time.perf_counter() - started, 1),
    }
