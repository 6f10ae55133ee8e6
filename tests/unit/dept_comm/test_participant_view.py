"""ModuleView's local filter and the Participant constructor's checks (no server needed)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from dept_comm.errors import ManifestMismatchError, ServerUnreachableError
from dept_comm.participant import ModuleView, Participant, SharedView


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.register_buffer("steps", torch.zeros(()))


def test_module_view_shares_parameters_except_the_local_ones() -> None:
    net = Net()
    assert set(ModuleView(net).shared()) == {
        "emb.weight",
        "body.0.weight",
        "body.0.bias",
        "body.1.weight",
        "body.1.bias",
    }  # fmt: skip  (buffers stay local)
    assert set(ModuleView(net, local=["emb.*"]).shared()) == {
        "body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias",
    }  # fmt: skip
    assert set(ModuleView(net, local="body.1.*").shared()) == {"emb.weight", "body.0.weight", "body.0.bias"}
    assert set(ModuleView(net, local=lambda n: n.endswith("bias")).shared()) == {
        "emb.weight", "body.0.weight", "body.1.weight",
    }  # fmt: skip
    assert isinstance(ModuleView(net), SharedView)
    with pytest.raises(ValueError, match="shares no parameter"):
        ModuleView(net, local=["*"])


def test_module_view_loads_in_place_and_checks_shapes() -> None:
    net = Net()
    view = ModuleView(net, local=["emb.*"])
    before = {n: p for n, p in net.named_parameters()}
    values = {n: torch.full_like(t, 2.0) for n, t in view.shared().items()}
    view.load(values)
    assert all(p is before[n] for n, p in net.named_parameters())
    assert torch.equal(net.body[0].weight, torch.full((4, 4), 2.0))
    assert not torch.equal(net.emb.weight, torch.full((8, 4), 2.0))
    with pytest.raises(ManifestMismatchError, match="body.0.weight"):
        view.load({**values, "body.0.weight": torch.zeros(2, 2)})


def test_an_unknown_codec_is_refused_in_the_constructor() -> None:
    with pytest.raises(ValueError, match="unknown codec 'nope'"):
        Participant(Net(), "127.0.0.1:1", codec="nope")


def test_an_unreachable_server_raises_a_typed_error_within_the_connect_timeout() -> None:
    p = Participant(Net(), "127.0.0.1:1", connect_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachableError) as info, p:
        pass
    assert time.monotonic() - t0 < 10
    assert info.value.address == "127.0.0.1:1" and info.value.waited_s >= 0.9
