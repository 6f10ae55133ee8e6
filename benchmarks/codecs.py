"""``dept-bench codecs``: ratio, speed and error of every registered codec on two inputs.

* ``random``: 16M elements (64 MiB) of N(0, 1) float32, encoded as one tensor;
* ``pseudo_gradient``: the parameter delta theta_100 - theta_0 of a small causal byte-level
  transformer (written here with ``torch.nn``, ~0.5M parameters) after 100 AdamW steps on Python
  standard-library source text, encoded tensor by tensor as a worker would send it.

Per codec and input: ``ratio_vs_fp32`` (numel * 4 / encoded bytes), ``encode_MBps`` and
``decode_MBps`` (fp32 input megabytes, 10**6 bytes, per second; best of a few repeats, one
thread) and ``rel_l2_error`` (||decode(encode(x)) - x|| / ||x|| over the whole input). Training
runs on the default thread count; only the codec timings are pinned to one thread.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import nn

from dept_comm.codecs import CodecParams, codec_names, get_codec
from dept_comm.codecs.gpu import (
    IMPLS,
    body_buffer,
    decode_on_device,
    encode_into,
    encode_on_device,
    resolve_impl,
)


@dataclasses.dataclass(frozen=True)
class _Setup:
    random_numel: int
    d_model: int
    layers: int
    heads: int
    context: int
    batch: int
    steps: int
    lr: float
    text_bytes: int
    repeats_random: int
    repeats_pseudo: int


FULL = _Setup(16 << 20, 128, 2, 4, 128, 8, 100, 1e-3, 4 << 20, 3, 5)
QUICK = _Setup(1 << 20, 64, 1, 2, 64, 4, 20, 1e-3, 1 << 20, 2, 3)
DEVICE_NUMEL = 1 << 26  # 256 MB of float32 on the device (also with --quick: smaller inputs time launches)


class _ByteLM(nn.Module):
    """Pre-norm causal transformer over bytes: embeddings, learned positions, a linear head."""

    def __init__(self, s: _Setup) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, s.d_model)
        self.pos = nn.Parameter(torch.randn(s.context, s.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            s.d_model, s.heads, 4 * s.d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, s.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(s.d_model)
        self.head = nn.Linear(s.d_model, 256)
        self.mask: torch.Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(s.context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        h = self.body(h, mask=self.mask[:t, :t], is_causal=True)
        out: torch.Tensor = self.head(self.norm(h))
        return out


def _stdlib_text(limit: int) -> np.ndarray:
    """Up to ``limit`` bytes of the standard library's own .py sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return np.frombuffer(b"".join(chunks)[:limit], dtype=np.uint8)


def _pseudo_gradient(s: _Setup) -> tuple[list[torch.Tensor], dict[str, Any]]:
    text = torch.from_numpy(_stdlib_text(s.text_bytes).astype(np.int64))
    torch.manual_seed(0)
    model = _ByteLM(s)
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    offsets = torch.arange(s.context + 1)
    start = time.perf_counter()
    losses = []
    for _ in range(s.steps):
        idx = torch.randint(0, text.numel() - s.context - 1, (s.batch, 1), generator=gen) + offsets
        batch = text[idx]
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach()))
    delta = [(p.detach() - p0).contiguous() for p, p0 in zip(model.parameters(), theta0, strict=True)]
    info = {
        "model": f"causal byte transformer d={s.d_model} layers={s.layers} heads={s.heads} ctx={s.context}",
        "params": sum(t.numel() for t in delta),
        "tensors": len(delta),
        "steps": s.steps,
        "optimizer": f"AdamW(lr={s.lr}, weight_decay=0.1)",
        "batch": s.batch,
        "text": f"{text.numel()} bytes of stdlib .py sources",
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "train_seconds": round(time.perf_counter() - start, 2),
        "train_threads": torch.get_num_threads(),
    }
    return delta, info


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up (first-touch allocations, lazily built zstd contexts)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(name: str, tensors: Sequence[torch.Tensor], repeats: int) -> dict[str, Any]:
    codec = get_codec(name)
    raw_bytes = sum(t.numel() * 4 for t in tensors)
    payloads = [codec.encode(t) for t in tensors]
    decoded = [codec.decode(p, t.shape) for p, t in zip(payloads, tensors, strict=True)]
    t_enc = _best(lambda: [codec.encode(t) for t in tensors], repeats)
    t_dec = _best(lambda: [codec.decode(p, t.shape) for p, t in zip(payloads, tensors, strict=True)], repeats)
    err = sum(float((d.double() - t.double()).pow(2).sum()) for d, t in zip(decoded, tensors, strict=True))
    ref = sum(float(t.double().pow(2).sum()) for t in tensors)
    return {
        "codec": name,
        "input": "",
        "ratio_vs_fp32": round(raw_bytes / max(1, sum(map(len, payloads))), 4),
        "encode_MBps": round(raw_bytes / t_enc / 1e6, 1),
        "decode_MBps": round(raw_bytes / t_dec / 1e6, 1),
        "rel_l2_error": float(f"{(err / ref) ** 0.5:.4g}") if ref else 0.0,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_synced(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _device_rows(numel: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """int8/int4 quantisation on ``device``, per implementation (Triton kernel, torch ops).

    * ``kernel_GBps``: the device work alone (input + residual in, body + new residual out);
    * ``encode_GBps``: payload bytes on the host without a zstd stage (kernel + the device-to-host
      copy of the packed body), i.e. what the host receives;
    * ``payload_GBps``: the codec's default payload (zstd level 1 on the host where it pays);
    * ``decode_GBps``: payload (no zstd) to a float32 tensor on the device (host-to-device copy
      of the body + decode);
    * ``bytes_identical_to_cpu``: the default payload equals the CPU codec's, byte for byte.

    GB/s: float32 input bytes (numel * 4) / 1e9 per second.
    """
    gen = torch.Generator().manual_seed(3)
    x_cpu = torch.randn(numel, generator=gen)
    x = x_cpu.to(device)
    rows: list[dict[str, Any]] = []
    for name in ("int8", "int4"):
        cpu_payload = get_codec(name).encode(x_cpu)
        for impl in IMPLS[1:]:
            row: dict[str, Any] = {"codec": name, "impl": impl, "numel": numel, "device": str(device)}
            try:
                resolve_impl(impl, device)
            except ValueError as err:
                rows.append(row | {"error": str(err)})
                continue
            rows.append(row | _device_row(name, impl, x, cpu_payload, repeats))
    return rows


def _device_row(name: str, impl: str, x: torch.Tensor, cpu_payload: bytes, repeats: int) -> dict[str, Any]:
    device, numel = x.device, x.numel()
    default = get_codec(name)
    plain = get_codec(name, CodecParams(block_size=default.params.block_size, zstd_level=0, bits=0))
    residual = torch.zeros(numel, device=device)
    out = body_buffer(plain, numel, device)
    gb = numel * 4 / 1e9
    t_kernel = _best_synced(
        lambda: encode_into(plain, x, residual, residual, out, impl=impl), repeats, device
    )
    t_encode = _best_synced(lambda: encode_on_device(plain, x, impl=impl), repeats, device)
    t_payload = _best_synced(lambda: encode_on_device(default, x, impl=impl), repeats, device)
    payload = encode_on_device(plain, x, impl=impl)
    t_decode = _best_synced(
        lambda: decode_on_device(plain, payload, (numel,), device=device), repeats, device
    )
    return {
        "kernel_GBps": round(gb / t_kernel, 2),
        "encode_GBps": round(gb / t_encode, 2),
        "payload_GBps": round(gb / t_payload, 2),
        "decode_GBps": round(gb / t_decode, 2),
        "bytes_identical_to_cpu": encode_on_device(default, x, impl=impl) == cpu_payload,
    }


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Measure every registered codec on ``random`` and ``pseudo_gradient`` inputs; with a
    ``device`` other than ``cpu``, also int8/int4 quantisation on that device (``device_codecs``)."""
    dev = torch.device(device)
    s = QUICK if quick else FULL
    started = time.perf_counter()
    threads = torch.get_num_threads()
    delta, pg_info = _pseudo_gradient(s)
    gen = torch.Generator().manual_seed(2)
    inputs: dict[str, tuple[list[torch.Tensor], int]] = {
        "random": ([torch.randn(s.random_numel, generator=gen)], s.repeats_random),
        "pseudo_gradient": (delta, s.repeats_pseudo),
    }
    results = []
    torch.set_num_threads(1)
    try:
        for input_name, (tensors, repeats) in inputs.items():
            for name in codec_names():
                row = _measure(name, tensors, repeats)
                row["input"] = input_name
                results.append(row)
    finally:
        torch.set_num_threads(threads)
    device_rows = _device_rows(DEVICE_NUMEL, dev, s.repeats_random + 2) if dev.type != "cpu" else []
    return {
        "codecs": results,
        "device_codecs": device_rows,
        "config": {
            "quick": quick,
            "random": {
                "numel": s.random_numel,
                "distribution": "N(0,1) float32",
                "repeats": s.repeats_random,
            },
            "pseudo_gradient": {**pg_info, "repeats": s.repeats_pseudo},
            "codec_params": {n: dataclasses.asdict(get_codec(n).params) for n in codec_names()},
            "MBps": "fp32 input bytes (numel * 4) / 1e6 per second, best of `repeats` after one warm-up",
            "versions": {
                "torch": torch.__version__,
                "numpy": np.__version__,
                "zstandard": zstandard.__version__,
                "python": platform.python_version(),
            },
            "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
            "seconds": round(time.perf_counter() - started, 1),
        },
        "threads": 1,
    }
