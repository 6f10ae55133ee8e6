"""Outer optimizers: FedAvg is the mean update, Nesterov matches torch.optim.SGD(nesterov=True)."""

from __future__ import annotations

import pytest
import torch

from dept_comm.errors import InvalidInputError, ManifestMismatchError, NonFiniteError
from dept_comm.outer import FedAvg, Nesterov, build_outer


def _deltas(gen: torch.Generator, num_workers: int = 3) -> list[dict[str, torch.Tensor]]:
    return [
        {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(5, generator=gen)}
        for _ in range(num_workers)
    ]


def _mean(deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in deltas]).mean(0) for k in deltas[0]}


def test_fedavg_update_is_lr_times_mean_delta() -> None:
    gen = torch.Generator().manual_seed(0)
    mean = _mean(_deltas(gen))
    update = FedAvg().step(mean)
    for k in mean:
        assert torch.equal(update[k], mean[k])
        assert update[k].data_ptr() != mean[k].data_ptr()  # a new tensor, never an alias
    half = FedAvg(lr=0.5).step(mean)
    assert torch.allclose(half["w"], 0.5 * mean["w"])


def test_fedavg_upcasts_to_fp32() -> None:
    update = FedAvg().step({"x": torch.ones(3, dtype=torch.bfloat16)})
    assert update["x"].dtype == torch.float32


@pytest.mark.parametrize(("lr", "momentum"), [(0.7, 0.9), (0.4, 0.5), (1.0, 0.0)])
def test_nesterov_matches_torch_sgd_over_steps(lr: float, momentum: float) -> None:
    gen = torch.Generator().manual_seed(1)
    theta0 = {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    ours = {k: v.clone() for k, v in theta0.items()}
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in theta0.items()}
    sgd = torch.optim.SGD(list(ref.values()), lr=lr, momentum=momentum, nesterov=momentum > 0)
    opt = Nesterov(lr=lr, momentum=momentum)
    for _ in range(5):
        mean = _mean(_deltas(gen))
        update = opt.step(mean)
        for k in ours:
            ours[k] = ours[k] + update[k]
        sgd.zero_grad()
        for k, p in ref.items():
            p.grad = -mean[k]  # DiLoCo: the outer gradient is minus the mean update
        sgd.step()
        for k in ours:
            assert torch.allclose(ours[k], ref[k].detach(), atol=1e-6, rtol=0), k
    assert opt.num_steps == 5


def test_nesterov_first_step_and_new_tensor_mid_run() -> None:
    opt = Nesterov(lr=0.7, momentum=0.9)
    g1 = {"w": torch.full((2,), 2.0)}
    u = opt.step(g1)
    # m = g = -2; update = -0.7 * (g + 0.9 m) = -0.7 * (-2 - 1.8) = 2.66
    assert torch.allclose(u["w"], torch.full((2,), 2.66))
    u2 = opt.step({"w": torch.zeros(2), "emb": torch.ones(3, 2)})  # "emb" seen for the first time
    assert torch.allclose(u2["emb"], torch.full((3, 2), 0.7 * 1.9))
    assert torch.allclose(u2["w"], torch.full((2,), -0.7 * 0.9 * 0.9 * -2.0))
    # a tensor absent from a step keeps its buffer untouched
    before = opt.state_dict()["buf.emb"].clone()
    opt.step({"w": torch.zeros(2)})
    assert torch.equal(opt.state_dict()["buf.emb"], before)


def test_nesterov_rejects_shape_change_and_non_finite_without_changing_state() -> None:
    opt = Nesterov()
    opt.step({"w": torch.ones(2)})
    saved = opt.state_dict()
    with pytest.raises(ManifestMismatchError, match="shape"):
        opt.step({"w": torch.ones(3)})
    with pytest.raises(NonFiniteError):
        opt.step({"w": torch.ones(2), "v": torch.tensor([float("nan")])})
    after = opt.state_dict()
    assert after.keys() == saved.keys()
    for k in saved:
        assert torch.equal(after[k], saved[k]), k


def test_state_dict_is_safetensors_friendly_and_round_trips(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(2)
    a = Nesterov(lr=0.4, momentum=0.9)
    for _ in range(3):
        a.step(_mean(_deltas(gen)))
    save_file(a.state_dict(), tmp_path / "outer.safetensors")
    state = load_file(tmp_path / "outer.safetensors")
    assert set(state) == {"kind", "lr", "momentum", "num_steps", "buf.w", "buf.b"}
    b = Nesterov(lr=0.4, momentum=0.9)
    b.load_state_dict(state)
    nxt = _mean(_deltas(gen))
    ua, ub = a.step(nxt), b.step(nxt)
    for k in ua:
        assert torch.equal(ua[k], ub[k])
    assert b.num_steps == 4
    with pytest.raises(InvalidInputError, match="nesterov"):
        FedAvg().load_state_dict(state)
    with pytest.raises(InvalidInputError, match="fedavg"):
        Nesterov().load_state_dict(FedAvg().state_dict())
    with pytest.raises(InvalidInputError, match="unknown keys"):
        Nesterov().load_state_dict({**state, "extra": torch.zeros(1)})
    f = FedAvg()
    f.step({"x": torch.ones(1)})
    g = FedAvg()
    g.load_state_dict(f.state_dict())
    assert g.num_steps == 1
    fresh = Nesterov()
    fresh.load_state_dict({})  # no saved state: stays fresh
    assert fresh.num_steps == 0 and set(fresh.state_dict()) == {"kind", "lr", "momentum", "num_steps"}


def test_changed_hyperparameters_are_logged_and_config_kept(caplog: pytest.LogCaptureFixture) -> None:
    a = Nesterov(lr=0.7, momentum=0.9)
    a.step({"w": torch.ones(2)})
    b = Nesterov(lr=0.4, momentum=0.9)
    with caplog.at_level("WARNING", logger="dept_comm.outer"):
        b.load_state_dict(a.state_dict())
    assert "outer_hparam_changed optimizer=nesterov key=lr saved=0.7 configured=0.4" in caplog.text
    assert b.lr == 0.4


def test_build_outer() -> None:
    assert isinstance(build_outer("fedavg", None, None), FedAvg)
    nes = build_outer("Nesterov", None, None)
    assert isinstance(nes, Nesterov)
    assert (nes.lr, nes.momentum) == (0.7, 0.9)
    custom = build_outer("nesterov", 0.4, 0.8)
    assert isinstance(custom, Nesterov)
    assert (custom.lr, custom.momentum) == (0.4, 0.8)
    with pytest.raises(ValueError, match="known: fedavg, nesterov"):
        build_outer("adam", None, None)
    with pytest.raises(ValueError, match="momentum"):
        build_outer("fedavg", 1.0, 0.9)
    with pytest.raises(ValueError):
        build_outer("nesterov", -1.0, None)
    with pytest.raises(ValueError):
        build_outer("nesterov", 0.7, 1.0)
