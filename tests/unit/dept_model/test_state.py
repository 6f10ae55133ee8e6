"""safetensors + JSON state files: exact round trips of nested optimizer-like state, atomic writes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from dept_model.state import clean_temp_files, load_state, save_state, state_from_bytes, state_to_bytes


def _nested():
    a = torch.arange(6, dtype=torch.float32).view(2, 3)
    return {
        "step": 7,
        "lr": 1.5e-4,
        "name": "body",
        "flag": True,
        "nothing": None,
        "nan": math.nan,
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)},
                5: {"exp_avg": torch.ones(1)},
            },
            "param_groups": [{"betas": (0.9, 0.95), "params": [0, 5], "weight_decay": 0.1}],
        },
        "views": [a, a[:, 1], a.t()],  # aliased and strided tensors
        "bf16": torch.randn(3).to(torch.bfloat16),
        "ids": torch.tensor([1, 5, 9]),
        "empty": torch.zeros(0, 4),
        "__weird": {"x": 1},
    }


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_file_round_trip_is_exact_and_plain_safetensors(tmp_path):
    state = _nested()
    path = tmp_path / "s.safetensors"
    save_state(path, state)
    _assert_same(state, load_state(path))
    with safe_open(str(path), framework="pt") as fh:  # a valid safetensors file, readable without us
        assert "optimizer.state.0.exp_avg" in fh.keys()  # noqa: SIM118 (safe_open is not a dict)
        assert fh.metadata()["format"] == "dept-state-v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_bytes_round_trip():
    state = _nested()
    _assert_same(state, state_from_bytes(state_to_bytes(state)))


def test_overwrite_and_temp_cleanup(tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, {"v": torch.zeros(2)})
    save_state(path, {"v": torch.ones(2)})
    assert torch.equal(load_state(path)["v"], torch.ones(2))
    (tmp_path / ".s.safetensors.tmp-1-abc").write_bytes(b"partial")
    assert clean_temp_files(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_rejects_unstorable_values_and_foreign_files(tmp_path):
    with pytest.raises(TypeError):
        state_to_bytes({"obj": object()})
    with pytest.raises(TypeError):
        save_state(tmp_path / "x", {"bad": {(1, 2): 3}})
    assert not list(tmp_path.iterdir())
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a dept state"):
        load_state(tmp_path / "plain.safetensors")
