"""dept_comm.server.ParameterServer over a plain tensor dict (no DEPT names, no DEPT hooks), driven
over real gRPC by two participants made of dept_comm's low-level pieces.

fp32 both ways and FedAvg with lr 1: after each round the server's tensors are exactly
θ + mean(Δ), the mean folded in ascending worker-id order in float32 as the server folds it
(dept_comm/server/aggregate.py: the first delta copied, the others added, then divided).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping

import pytest
import torch

from dept_comm.codecs import get_codec
from dept_comm.errors import ManifestMismatchError
from dept_comm.frames import as_message
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.server import ParameterServer, ServerConfig, ServerHooks
from dept_comm.streaming import PULL_LIMITS, StreamOpenInfo, encode_stream, receive_stream

ROUNDS = 2


def _mlp(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(16, 8, generator=gen),
        "fc1.bias": torch.randn(16, generator=gen),
        "fc2.weight": torch.randn(4, 16, generator=gen),
    }


def _delta(theta: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 1e-2 for k, v in theta.items()}


def _reference_mean(deltas: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The server's fold: ascending worker id, float32, copy then add, then divide by the count."""
    order = sorted(deltas)
    out = {}
    for name in deltas[order[0]]:
        acc = deltas[order[0]][name].to(torch.float32, copy=True).mul_(1.0)
        for wid in order[1:]:
            acc.add_(deltas[wid][name], alpha=1.0)
        out[name] = acc.div_(float(len(order)))
    return out


class Participant:
    """A participant as a test drives it: join, pull the whole state, push a delta, commit."""

    def __init__(self, port: int, name: str) -> None:
        self.client = ServerClient(f"127.0.0.1:{port}", timeout_s=20)
        reply = self.client.join(service_pb2.JoinRequest(source_id=name, worker_name=name, codecs=["fp32"]))
        self.worker_id = reply.worker_id
        self.reply = reply

    def pull(self) -> tuple[StreamOpenInfo, dict[str, torch.Tensor]]:
        messages = self.client.pull(service_pb2.PullRequest(worker_id=self.worker_id, full=True))
        return receive_stream(messages, limits=PULL_LIMITS)

    def push_and_commit(self, info: StreamOpenInfo, delta: dict[str, torch.Tensor], round_idx: int) -> None:
        open_info = StreamOpenInfo(
            upload_id=f"u-{uuid.uuid4().hex}",
            sender_id=self.worker_id,
            round_idx=round_idx,
            base_version=info.target_version,
            base_digest=info.target_digest,
            is_delta=True,
        )
        messages = list(encode_stream(delta, open_info=open_info, codec=get_codec("fp32")))
        receipt = self.client.push(messages[:-1])
        assert receipt.num_chunks == len(messages) - 2
        reply = self.client.commit(
            service_pb2.CommitUpdateRequest(
                commit=as_message(messages[-1]).commit,
                worker_id=self.worker_id,
                round_idx=round_idx,
                train_loss=1.0,
            )
        )
        assert reply.accepted

    def leave(self) -> None:
        self.client.leave(service_pb2.LeaveRequest(worker_id=self.worker_id, reason="done"))
        self.client.close()


def test_parameter_server_averages_any_named_tensors_bit_for_bit() -> None:
    theta = _mlp()
    config = ServerConfig(
        port=0, rounds=ROUNDS, workers=2, codec_up="fp32", codec_down="fp32", round_timeout_s=60.0
    )
    closed: list[int] = []
    hooks = ServerHooks(label="mlp", on_round_closed=lambda record, tensors: closed.append(record.round))
    with ParameterServer(theta, config, hooks) as server:
        assert server.port > 0
        a, b = Participant(server.port, "alpha"), Participant(server.port, "beta")
        numel = sum(t.numel() for t in theta.values())
        run_info = json.loads(a.reply.run_config_json)
        assert run_info["rounds"] == ROUNDS and run_info["full_model_fp32_bytes"] == 4 * numel
        expected = {k: v.clone() for k, v in theta.items()}
        for round_idx in range(ROUNDS):
            deltas = {}
            for seed, p in enumerate((a, b)):
                info, pulled = p.pull()
                assert set(pulled) == set(theta)
                for name, t in pulled.items():
                    assert torch.equal(t, expected[name]), name
                delta = _delta(theta, seed=10 * round_idx + seed)
                deltas[p.worker_id] = delta
                p.push_and_commit(info, delta, round_idx)
            mean = _reference_mean(deltas)
            expected = {k: torch.add(expected[k], mean[k]) for k in expected}
            now = server.tensors()
            for name in expected:
                assert torch.equal(now[name], expected[name]), f"round {round_idx}: {name} differs"
        for p in (a, b):
            info, pulled = p.pull()  # the final state, as a participant evaluates it
            assert all(torch.equal(pulled[k], expected[k]) for k in expected)
            p.leave()
        assert server.wait(timeout_s=20)
        records = server.records
    assert closed == list(range(ROUNDS))
    assert [r.round for r in records] == list(range(ROUNDS))
    for r in records:
        assert r.variant == "mlp" and r.num_workers == 2
        assert r.uncompressed_body_bytes == 4 * numel  # every tensor counts as the shared body
        assert r.up_payload_bytes >= 2 * 4 * numel  # fp32: each participant sent every element
        assert r.down_payload_bytes >= 2 * 4 * numel
        assert {w.source for w in r.workers} == {"alpha", "beta"}
        assert all(w.up_by_group.get("body") and w.down_by_group.get("body") for w in r.workers)
    assert server.version == ROUNDS
    assert all(torch.equal(server.tensors()[k], expected[k]) for k in expected)


def test_admit_hook_refuses_a_join() -> None:
    def admit(attributes: Mapping[str, str], schema: str) -> None:
        if attributes.get("team") != "red":
            raise ManifestMismatchError(f"team {attributes.get('team')!r} is not welcome")

    config = ServerConfig(port=0, rounds=1, workers=1, codec_up="fp32", codec_down="fp32")
    with ParameterServer(_mlp(), config, ServerHooks(admit=admit)) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=10, retry_attempts=1)
        try:
            with pytest.raises(ManifestMismatchError, match="'blue' is not welcome"):
                client.join(service_pb2.JoinRequest(source_id="s", attributes={"team": "blue"}))
            reply = client.join(service_pb2.JoinRequest(source_id="s", attributes={"team": "red"}))
            assert reply.worker_id
        finally:
            client.close()
        server.stop(save=False)


@pytest.mark.parametrize(
    ("tensors", "hooks", "needle"),
    [
        ({}, None, "non-empty mapping"),
        ({"w": torch.zeros(2, dtype=torch.int64)}, None, "tensors['w']"),
        ({"w": torch.tensor([float("nan")])}, None, "finite"),
        ({"w": torch.zeros(3)}, ServerHooks(row_subset="w"), "hooks.row_subset"),
        ({"w": torch.zeros(3)}, ServerHooks(row_subset="missing"), "hooks.row_subset"),
    ],
)
def test_parameter_server_refuses_bad_inputs_at_construction(
    tensors: dict[str, torch.Tensor], hooks: ServerHooks | None, needle: str
) -> None:
    with pytest.raises(ValueError, match=None) as err:
        ParameterServer(tensors, ServerConfig(port=0), hooks)
    assert needle in str(err.value)


def test_server_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="rounds"):
        ServerConfig(rounds=0)
    with pytest.raises(ValueError, match="min_workers"):
        ServerConfig(workers=2, min_workers=3)
    with pytest.raises(ValueError, match="ServerConfig"):
        ParameterServer(_mlp(), object(), None)  # type: ignore[arg-type]


def test_a_server_not_started_has_no_port_and_stops_quietly() -> None:
    server = ParameterServer(_mlp(), ServerConfig(port=0))
    with pytest.raises(RuntimeError, match="start"):
        _ = server.port
    server.stop()
    assert server.records == [] and server.version == 0
    assert torch.equal(server.tensors()["fc1.bias"], _mlp()["fc1.bias"])
