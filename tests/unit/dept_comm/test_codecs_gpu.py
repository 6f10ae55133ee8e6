"""Device quantisation (``dept_comm.codecs.gpu``) against the CPU int8/int4 codecs: the same payload
bytes, the same decoded values and the same error-feedback residuals, bit for bit.

The torch path runs here on CPU; the Triton kernel runs on CPU under the Triton interpreter (in a
subprocess with ``TRITON_INTERPRET=1``, skipped where triton is not installed) and on CUDA in the
``gpu``-marked tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dept_comm.codecs import CodecParams, ErrorFeedback, get_codec
from dept_comm.codecs.gpu import (
    DeviceErrorFeedback,
    decode_on_device,
    encode_on_device,
    make_feedback,
    resolve_impl,
)
from dept_comm.errors import ManifestMismatchError, SizeLimitError

CODECS = [
    ("int8", None),
    ("int4", None),
    ("int8", CodecParams(block_size=16, zstd_level=0, bits=8)),
    ("int4", CodecParams(block_size=1024, zstd_level=3, bits=4)),
    ("int4", CodecParams(block_size=130, zstd_level=0, bits=4)),  # even, not a power of two
]
SIZES = [1, 2, 17, 128, 129, 1000, 4097, 70001]


def hard_input(n: int, seed: int) -> torch.Tensor:
    """Magnitudes from subnormal to near float32's max, exact ties, zeros, -0.0, NaN and Inf blocks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.pow(10.0, torch.randint(-42, 36, (n,), generator=gen).float())
    if n >= 16:
        x[: n // 8] = torch.randn(n // 8, generator=gen) * 1e-3  # a well-behaved stretch
    if n >= 1000:
        x[130:140] = torch.tensor([0.5, -0.5, 1.5, -2.5, 3.5, 127.0, -127.0, 7.0, -7.0, 0.0])
        x[200:460] = 0.0
        x[300] = -0.0
        x[520:600] = 3.0e38
        x[610] = -torch.finfo(torch.float32).max
        x[700] = float("nan")
        x[900] = float("inf")
        x[950] = float("-inf")
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _assert_same_values(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit-identical, except that a NaN may carry another payload (NaN blocks of hostile input;
    an update with NaN is refused before it is decoded for use)."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), (what, "NaN positions differ")
    differ = (_bits(got) != _bits(want)) & ~nan
    where = differ.nonzero().flatten()[:8].tolist()
    assert not where, (what, where, got[where].tolist(), want[where].tolist())


@pytest.mark.parametrize(("name", "params"), CODECS)
def test_torch_path_bytes_equal_cpu_codec(name: str, params: CodecParams | None) -> None:
    codec = get_codec(name, params)
    for i, n in enumerate(SIZES):
        x = hard_input(n, seed=i)
        want = codec.encode(x)
        assert encode_on_device(codec, x, impl="torch") == want, (name, params, n)
        got = decode_on_device(codec, want, (n,), device="cpu")
        assert torch.equal(_bits(got), _bits(codec.decode(want, (n,)))), (name, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_torch_path_other_input_dtypes(dtype: torch.dtype) -> None:
    codec = get_codec("int4")
    x = (torch.randn(3, 333, generator=torch.Generator().manual_seed(1)) * 5).to(dtype)
    assert encode_on_device(codec, x, impl="torch") == codec.encode(x)
    payload = codec.encode(x)
    got = decode_on_device(codec, payload, (3, 333), dtype=torch.bfloat16, device="cpu")
    assert got.dtype == torch.bfloat16 and torch.equal(got, codec.decode(payload, (3, 333), torch.bfloat16))


def test_residual_argument_equals_encoding_the_sum() -> None:
    codec = get_codec("int8")
    gen = torch.Generator().manual_seed(3)
    x, r = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen) * 1e-2
    out = torch.empty(5000)
    payload = encode_on_device(codec, x, r, update_residual=out, impl="torch")
    assert payload == codec.encode(x + r)
    assert torch.equal(_bits(out), _bits((x + r) - codec.decode(payload, (5000,))))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_device_feedback_equals_cpu_feedback(name: str) -> None:
    codec = get_codec(name)
    cpu, dev = ErrorFeedback(codec), DeviceErrorFeedback(codec, "cpu", impl="torch")
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        tensors = {"a": torch.randn(64, 33, generator=gen), "b": torch.randn(1001, generator=gen) * 1e-4}
        for key, t in tensors.items():
            if step == 3 and key == "b":  # encode_with_decoded: the same payload and decoded values
                (p_cpu, d_cpu), (p_dev, d_dev) = (
                    cpu.encode_with_decoded(key, t),
                    dev.encode_with_decoded(key, t),
                )
                assert torch.equal(_bits(d_cpu), _bits(d_dev))
            else:
                p_cpu, p_dev = cpu.encode(key, t), dev.encode(key, t)
            assert p_cpu == p_dev, (name, step, key)
            r_cpu, r_dev = cpu.residual(key), dev.residual(key)
            assert r_cpu is not None and r_dev is not None
            assert torch.equal(_bits(r_cpu), _bits(r_dev))
    # State dicts are interchangeable: a CPU state resumes on the device and the other way round.
    resumed = DeviceErrorFeedback(codec, "cpu", impl="torch")
    resumed.load_state_dict(cpu.state_dict())
    back = ErrorFeedback(codec)
    back.load_state_dict(dev.state_dict())
    t = torch.randn(64, 33, generator=gen)
    assert resumed.encode("a", t) == back.encode("a", t) == cpu.encode("a", t)
    with pytest.raises(ManifestMismatchError, match="residual has shape"):
        dev.encode("a", torch.zeros(10))


def test_decode_checks_lengths_and_hostile_scales() -> None:
    codec = get_codec("int8", CodecParams(block_size=16, zstd_level=0, bits=8))
    with pytest.raises(SizeLimitError):
        decode_on_device(codec, b"\x00" * 10, (32,), device="cpu")
    rng = np.random.default_rng(0)
    body = rng.integers(0, 256, size=2 * 4 + 64, dtype=np.uint8)
    body[:8].view("<u2")[:] = [0x7FC0, 0x7F80, 0xFF80, 0x0001]  # NaN, +Inf, -Inf, subnormal scales
    got = decode_on_device(codec, body.tobytes(), (64,), device="cpu")
    want = codec.decode(body.tobytes(), (64,))
    assert torch.equal(_bits(got), _bits(want))


def test_fallbacks_and_errors() -> None:
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cuda", torch.device("cpu"))
    assert type(make_feedback(get_codec("int8"), "cpu")) is ErrorFeedback
    assert type(make_feedback(get_codec("bf16"), "cuda")) is ErrorFeedback  # no device encoder
    with pytest.raises(ManifestMismatchError):
        encode_on_device(get_codec("fp32"), torch.zeros(4))
    with pytest.raises(ManifestMismatchError):
        encode_on_device(get_codec("int8"), torch.zeros(4, dtype=torch.int32))
    assert encode_on_device(get_codec("int8"), torch.zeros(0)) == b""


def _kernel_check(device: str) -> dict[str, bool]:
    """Triton kernel against the CPU codecs on ``device``: payloads, residuals, in-place updates."""
    results: dict[str, bool] = {}
    for name, params in CODECS:
        codec = get_codec(name, params)
        for i, n in enumerate(SIZES):
            x = hard_input(n, seed=i)
            key = f"{name}/{codec.params.block_size}/{n}"
            results[key] = encode_on_device(codec, x.to(device), impl="triton") == codec.encode(x)
        cpu, dev = ErrorFeedback(codec), DeviceErrorFeedback(codec, device, impl="triton")
        gen = torch.Generator().manual_seed(9)
        same = True
        for _ in range(3):
            t = torch.randn(4099, generator=gen)
            same &= cpu.encode("w", t) == dev.encode("w", t.to(device))
            same &= torch.equal(_bits(cpu.residual("w")), _bits(dev.residual("w").cpu()))  # type: ignore[union-attr]
        results[f"{name}/{codec.params.block_size}/feedback"] = bool(same)
    return results


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed here")
def test_triton_kernel_under_interpreter_bytes_equal_cpu_codec() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.dept_comm.test_codecs_gpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CODECS) * (len(SIZES) + 1)
    assert all(results.values()), [k for k, ok in results.items() if not ok]


@pytest.mark.gpu
def test_cuda_triton_and_torch_paths_bytes_equal_cpu_codec() -> None:
    results = _kernel_check("cuda")
    assert all(results.values()), [k for k, ok in results.items() if not ok]
    for name, params in CODECS:
        codec = get_codec(name, params)
        x = hard_input((1 << 20) + 77, seed=11)
        want = codec.encode(x)
        assert encode_on_device(codec, x.cuda(), impl="torch") == want
        got = decode_on_device(codec, want, (x.numel(),), device="cuda")
        assert got.is_cuda
        _assert_same_values(got.cpu(), codec.decode(want, (x.numel(),)), name)


@pytest.mark.gpu
def test_cuda_make_feedback_keeps_residuals_on_the_gpu() -> None:
    fb = make_feedback(get_codec("int4"), "cuda")
    assert isinstance(fb, DeviceErrorFeedback) and fb.impl in ("triton", "torch")
    fb.encode("x", torch.randn(1000))
    r = fb.residual("x")
    assert r is not None and r.is_cuda and not fb.state_dict()["x"].is_cuda


@pytest.mark.gpu
def test_cuda_pull_stream_decodes_on_the_gpu_bit_for_bit() -> None:
    """A pull received with device=cuda: int8/int4 tensors dequantised on the GPU, the others on
    the CPU, every value bit-identical to the CPU receiver's."""
    from dept_comm.digest import Group
    from dept_comm.streaming import StreamOpenInfo, encode_stream, receive_stream

    gen = torch.Generator().manual_seed(3)
    tensors = {
        "body.a": torch.randn(3, 100_001, generator=gen),
        "body.b": torch.randn(5000, generator=gen) * 1e-3,
    }
    for name in ("int8", "int4", "fp32"):
        codec = get_codec(name)
        info = StreamOpenInfo(upload_id="p", sender_id="server", round_idx=0, is_delta=True)
        msgs = list(encode_stream(tensors, open_info=info, codec=codec, groups=Group.BODY))
        _, on_cpu = receive_stream(msgs)
        _, on_gpu = receive_stream(msgs, device=torch.device("cuda"))
        for key, want in on_cpu.items():
            got = on_gpu[key]
            assert got.is_cuda == (name != "fp32"), (name, key)
            assert torch.equal(_bits(got.cpu()), _bits(want)), (name, key)


if __name__ == "__main__":  # run by the interpreter test in a subprocess with TRITON_INTERPRET=1
    torch.set_num_threads(1)
    print(json.dumps(_kernel_check("cpu")))
